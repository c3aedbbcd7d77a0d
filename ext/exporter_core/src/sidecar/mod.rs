//! The sidecar: one sender for a whole preforking server.
//!
//! Instead of every worker process running its own agent connections,
//! exposure dedup and evaluation aggregate, the forking parent (Puma or
//! Unicorn master, a Resque parent) runs a [`listener::Listener`] on its
//! shared runtime, and each child hands its payloads over a connection it
//! inherited through fork: one end of a socketpair made by the fork hooks
//! (no name, nothing else can reach it).
//!
//! - [`wire`]: the versioned frame protocol (any Unix stream socket);
//! - [`peer`]: `SO_PEERCRED` checks of accepted connections;
//! - [`listener`]: the parent's side (connections, one sender per
//!   destination, acks once queued, bounded memory);
//! - [`client`]: the child's side (handover with bounded waits);
//! - [`sink`]: the batch-worker sink that hands over first and sends
//!   direct what was not acknowledged;
//! - [`rendezvous`]: where a per-user helper (subprocess mode) and its
//!   clients meet, and why that place is safe;
//! - [`subprocess`]: the host's side of subprocess mode (connect, start
//!   the helper, reconnect with a back-off).
//!
//! In subprocess mode (and in `auto` before the first fork when a helper
//! is running, or `EXPORTER_SIDECAR_SOCKET` is set), the listener is the
//! per-user helper process `exporter-sidecar` (the same [`listener`] code
//! behind a named socket), and the process is its client: the sinks get a
//! connection from [`acquire`], which (re)connects when needed.
//!
//! This module owns the process's mode and role and drives them through
//! the fork lifecycle (called from the runtime's fork hooks):
//! - `before_fork`: a process that may be a listener (mode thread, or
//!   auto; not a client nor a child of one) becomes one if it was not,
//!   and makes the socketpair for the child;
//! - `after_fork_parent`: the listener adopts its end; the child's is
//!   closed;
//! - `after_fork_child`: the child closes the listener's end, retires any
//!   listener it inherited, and becomes a client on its end. A child of a
//!   client (Puma's `fork_worker`, a fork inside a worker) closes the
//!   inherited connection and runs direct.

pub mod client;
pub mod listener;
pub mod peer;
pub mod rendezvous;
pub mod sink;
pub mod subprocess;
pub mod wire;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use listener::{Limits, Listener};
use subprocess::{HelperConfig, Reconnect};

/// `EXPORTER_SIDECAR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Thread mode once the process forks; direct until then.
    Auto,
    Thread,
    /// A client of the per-user helper process.
    Subprocess,
    Off,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Some(Mode::Auto),
            "thread" => Some(Mode::Thread),
            "subprocess" => Some(Mode::Subprocess),
            "off" | "false" | "0" | "direct" => Some(Mode::Off),
            _ => None,
        }
    }
}

/// What this process is to the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    None,
    Listener,
    Client,
}

/// Counters of this process's client side. Per kind, what was offered
/// to the sidecar adds up: `*_handed_over + *_direct` (traces alone over
/// the payload cap aside: dropped, in the writer's `dropped`). Items are
/// traces, exposure events and flag evaluations (the sum of the rows'
/// counts, as `FlagEvaluations#stats`), never bodies or bytes; `frames_*`
/// count messages, `fallback_batches` batches.
#[derive(Debug, Default)]
pub struct Counters {
    /// Traces the listener acknowledged (it holds them).
    pub traces_handed_over: AtomicU64,
    /// Exposure events the listener acknowledged.
    pub exposures_handed_over: AtomicU64,
    /// Flag evaluations the listener acknowledged.
    pub evaluations_handed_over: AtomicU64,
    /// Traces the sidecar did not take, given to this process's own
    /// sender (how they fared is in the writer's stats).
    pub traces_direct: AtomicU64,
    /// Exposure events the sidecar did not take, sent by this process.
    pub exposures_direct: AtomicU64,
    /// Flag evaluations the sidecar did not take, sent by this process.
    pub evaluations_direct: AtomicU64,
    /// Frames acknowledged.
    pub frames_acknowledged: AtomicU64,
    /// Frames refused by the listener (full, bad destination).
    pub frames_nacked: AtomicU64,
    /// Frames that got no answer in time.
    pub frames_timed_out: AtomicU64,
    /// Frames that failed otherwise (connection refused, closed, broken).
    pub frames_failed: AtomicU64,
    /// Batches (or their rest) that fell back to the direct path.
    pub fallback_batches: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    traces_handed_over: AtomicU64::new(0),
    exposures_handed_over: AtomicU64::new(0),
    evaluations_handed_over: AtomicU64::new(0),
    traces_direct: AtomicU64::new(0),
    exposures_direct: AtomicU64::new(0),
    evaluations_direct: AtomicU64::new(0),
    frames_acknowledged: AtomicU64::new(0),
    frames_nacked: AtomicU64::new(0),
    frames_timed_out: AtomicU64::new(0),
    frames_failed: AtomicU64::new(0),
    fallback_batches: AtomicU64::new(0),
};

impl Counters {
    /// Every counter with its name, in a stable order.
    pub fn all(&self) -> [(&'static str, &AtomicU64); 11] {
        [
            ("traces_handed_over", &self.traces_handed_over),
            ("exposures_handed_over", &self.exposures_handed_over),
            ("evaluations_handed_over", &self.evaluations_handed_over),
            ("traces_direct", &self.traces_direct),
            ("exposures_direct", &self.exposures_direct),
            ("evaluations_direct", &self.evaluations_direct),
            ("frames_acknowledged", &self.frames_acknowledged),
            ("frames_nacked", &self.frames_nacked),
            ("frames_timed_out", &self.frames_timed_out),
            ("frames_failed", &self.frames_failed),
            ("fallback_batches", &self.fallback_batches),
        ]
    }
}

struct State {
    mode: Mode,
    role: Role,
    listener: Option<Arc<Listener>>,
    /// (listener's end, child's end) between `before_fork` and after it.
    pending: Option<(UnixStream, UnixStream)>,
    /// Forked from a process where the sidecar was on: never a listener.
    forked: bool,
    gem_version: String,
    /// Socketpairs that could not be made.
    pair_errors: u64,
    /// Where the per-user helper is (default rendezvous, or
    /// `EXPORTER_SIDECAR_SOCKET`) and how to start it.
    helper: Option<Arc<HelperConfig>>,
    /// This process hands over to the helper (its role is then `Client`).
    via_helper: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    mode: Mode::Auto,
    role: Role::None,
    listener: None,
    pending: None,
    forked: false,
    gem_version: String::new(),
    pair_errors: 0,
    helper: None,
    via_helper: false,
});

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets the mode (from `EXPORTER_SIDECAR`) and the gem version spoken in
/// handshakes. Switching to `Off` later stops nothing already running.
pub fn configure(mode: Mode, gem_version: &str) {
    let mut st = state();
    st.mode = mode;
    st.gem_version = gem_version.to_owned();
}

/// Sets where the per-user helper is: `socket` from
/// `EXPORTER_SIDECAR_SOCKET` (else the default rendezvous of this user and
/// gem version), the helper binary installed with the gem, and its idle
/// period. Call after [`configure`]. In `subprocess` mode (and `auto` with
/// an explicit socket) the process becomes the helper's client now; it
/// connects at its first handover.
pub fn configure_helper(
    socket: Option<PathBuf>,
    binary: Option<PathBuf>,
    idle_seconds: Option<u64>,
) -> Result<(), rendezvous::RendezvousError> {
    let mut st = state();
    let explicit = socket.is_some();
    let paths = match socket {
        Some(s) => rendezvous::Paths::for_socket(&s),
        None => rendezvous::Paths::default_for(&st.gem_version),
    };
    let paths = match paths {
        Ok(p) => p,
        Err(e) => {
            st.helper = None;
            st.via_helper = false;
            return Err(e);
        }
    };
    st.helper = Some(Arc::new(HelperConfig {
        paths,
        explicit,
        binary,
        idle_seconds,
        gem_version: st.gem_version.clone(),
    }));
    let eligible = st.role == Role::None && !st.forked && st.listener.is_none();
    st.via_helper = eligible && uses_helper(st.mode, explicit);
    if st.via_helper {
        st.role = Role::Client;
    }
    Ok(())
}

/// Whether a process in `mode` hands over to the helper from the start
/// (rather than only when `auto` finds one running).
fn uses_helper(mode: Mode, explicit_socket: bool) -> bool {
    mode == Mode::Subprocess || (mode == Mode::Auto && explicit_socket)
}

/// Why [`start`] did nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// A worker (a client, or a child of one) never starts a listener.
    NotAParent,
    Off,
    /// In subprocess mode the helper is the listener.
    Subprocess,
    Runtime(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::NotAParent => f.write_str(
                "this process was forked from a sidecar process: it never starts a listener",
            ),
            StartError::Off => f.write_str("the sidecar is off"),
            StartError::Subprocess => {
                f.write_str("in subprocess mode the per-user helper is the listener")
            }
            StartError::Runtime(e) => write!(f, "cannot start the listener: {e}"),
        }
    }
}

/// Makes this process a listener now (`Exporter::Sidecar.start`), so its
/// next children are clients. Idempotent.
pub fn start() -> Result<(), StartError> {
    let mut st = state();
    if st.role == Role::Client || st.forked {
        return Err(StartError::NotAParent);
    }
    match st.mode {
        Mode::Off => return Err(StartError::Off),
        Mode::Subprocess => return Err(StartError::Subprocess),
        Mode::Auto | Mode::Thread => {}
    }
    leave_helper(&mut st);
    become_listener(&mut st).map_err(StartError::Runtime)
}

fn become_listener(st: &mut State) -> Result<(), String> {
    if st.listener.is_some() {
        return Ok(());
    }
    let l = Arc::new(Listener::new(&st.gem_version, Limits::default()));
    match crate::worker::register(&l) {
        Ok(()) => {
            st.listener = Some(l);
            st.role = Role::Listener;
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Before fork: a process that may be a listener gets ready to give the
/// child its connection.
pub fn before_fork() {
    let mut st = state();
    st.pending = None;
    // In auto, a client of the helper becomes the listener at its first
    // fork, as any other process (what it handed over is the helper's).
    let eligible = matches!(st.mode, Mode::Auto | Mode::Thread)
        && (st.role != Role::Client || st.via_helper)
        && !st.forked;
    if !eligible {
        return;
    }
    leave_helper(&mut st);
    // Registering may start the runtime: that is fine here, the runtime's
    // own before_fork (which runs next) stops it again.
    if become_listener(&mut st).is_err() {
        return;
    }
    // std makes both ends close-on-exec.
    match UnixStream::pair() {
        Ok(pair) => st.pending = Some(pair),
        Err(_) => st.pair_errors += 1,
    }
}

/// In the parent after fork (or after a failed fork): the listener
/// adopts its end, the child's end is closed here.
pub fn after_fork_parent() {
    let (pending, listener) = {
        let mut st = state();
        (st.pending.take(), st.listener.clone())
    };
    if let (Some((ours, theirs)), Some(l)) = (pending, listener) {
        drop(theirs);
        l.adopt(ours);
    }
}

/// In a child: becomes a client on the inherited end, or direct.
pub fn after_fork_child() {
    let mut st = state();
    let was_sidecar = st.role != Role::None || st.pending.is_some();
    if let Some(l) = st.listener.take() {
        // Its connections and senders belong to the parent. It retires
        // (closing the inherited connections) when the runtime resumes
        // its workers in the child; it is leaked, never dropped: what it
        // owned was bound to the parent's runtime.
        std::mem::forget(l);
    }
    // An inherited client connection is the parent's: closed here.
    client::set(None);
    st.role = Role::None;
    subprocess::after_fork_child();
    st.via_helper = false;
    if let Some((ours, theirs)) = st.pending.take() {
        drop(ours);
        client::set(Some(Arc::new(client::Client::new(theirs, &st.gem_version))));
        st.role = Role::Client;
    } else if st.mode == Mode::Subprocess && st.helper.is_some() {
        // Every process of a subprocess-mode tree connects to the helper
        // itself (at its first handover).
        st.via_helper = true;
        st.role = Role::Client;
    }
    if was_sidecar {
        st.forked = true;
    }
    for (_, c) in COUNTERS.all() {
        c.store(0, Ordering::Relaxed);
    }
}

/// Stops handing over to the helper (this process becomes a listener).
fn leave_helper(st: &mut State) {
    if st.via_helper {
        st.via_helper = false;
        st.role = Role::None;
        client::set(None);
    }
}

/// The connection the sinks hand over through, if this process is a
/// sidecar client: its thread-mode connection, or its helper connection,
/// (re)connected here when broken and the back-off allows (the attempt
/// blocks, bounded, through [`client::blocking`]; the common paths take
/// a lock and return). In subprocess mode,
/// while no helper can be reached, a client that refuses every handover
/// (the sinks send direct, counted). In `auto`, a process that has not
/// forked and is no client looks for a running helper (never starts one).
pub fn acquire() -> Option<Arc<client::Client>> {
    let current = client::current();
    if current.as_ref().is_some_and(|c| !c.is_broken()) {
        return current;
    }
    let (cfg, discovering) = {
        let st = state();
        let Some(cfg) = st.helper.clone() else {
            return current;
        };
        if st.via_helper {
            (cfg, false)
        } else if st.mode == Mode::Auto
            && st.role == Role::None
            && !st.forked
            && st.listener.is_none()
        {
            (cfg, true)
        } else {
            return current;
        }
    };
    if current.as_ref().is_some_and(|c| {
        c.broken_reason()
            .is_some_and(|why| !why.starts_with(UNAVAILABLE))
    }) {
        // It was up, and broke (helper killed or gone): counted once.
        subprocess::COUNTERS.lost.fetch_add(1, Ordering::Relaxed);
        client::set(Some(Arc::new(client::Client::unavailable(
            &format!("{UNAVAILABLE}: the connection to the helper broke"),
            &cfg.gem_version,
        ))));
    }
    let may_start = !discovering && cfg.binary.is_some();
    let attempt = if subprocess::due() {
        client::blocking(|| subprocess::reconnect(&cfg, may_start, discovering))
    } else {
        Reconnect::Unavailable(subprocess::WAITING.to_owned())
    };
    match attempt {
        Reconnect::Connected(c) => {
            let mut st = state();
            let still = if discovering {
                st.mode == Mode::Auto
                    && st.role == Role::None
                    && !st.forked
                    && st.listener.is_none()
            } else {
                st.via_helper
            };
            if !still {
                return client::current();
            }
            if discovering {
                st.via_helper = true;
                st.role = Role::Client;
            }
            client::set(Some(c.clone()));
            Some(c)
        }
        Reconnect::Unavailable(why) if !discovering => {
            let c = client::current()
                .filter(|c| c.is_broken())
                .unwrap_or_else(|| {
                    let c = Arc::new(client::Client::unavailable(
                        &format!("{UNAVAILABLE}: {why}"),
                        &cfg.gem_version,
                    ));
                    client::set(Some(c.clone()));
                    c
                });
            Some(c)
        }
        Reconnect::Unavailable(_) => None,
    }
}

/// How the reason of a client made unavailable by [`acquire`] starts.
const UNAVAILABLE: &str = "no sidecar helper reachable";

/// The status JSON of the helper at `socket`, or else of the one this
/// process would use (on a connection of its own; never starts one).
pub fn helper_status(socket: Option<PathBuf>) -> Result<String, String> {
    let cfg = state().helper.clone();
    let mut cfg = cfg.ok_or_else(|| "no helper configured".to_owned())?;
    if let Some(s) = socket {
        let paths = rendezvous::Paths::for_socket(&s).map_err(|e| e.to_string())?;
        cfg = Arc::new(HelperConfig {
            paths,
            explicit: true,
            ..(*cfg).clone()
        });
    }
    subprocess::query_status(&cfg)
}

/// After `Process.daemon`: the same process goes on (its parent exited);
/// no child connection was handed out.
pub fn after_daemon() {
    state().pending = None;
}

/// Sends everything the listener holds now (at exit); true once the agent
/// accepted all of it. Resolves at once in a process with no listener.
pub fn flush() -> impl std::future::Future<Output = bool> + Send + 'static {
    let l = state().listener.clone();
    let f = l.as_ref().map(|l| l.flush());
    async move {
        match f {
            Some(f) => f.await,
            None => true,
        }
    }
}

/// A snapshot for `Exporter::Sidecar.status`.
#[derive(Debug, Clone)]
pub struct Status {
    pub configured: Mode,
    /// A listener, or a client with a live thread-mode connection.
    pub thread_mode: bool,
    /// A client of the per-user helper (connected or reconnecting).
    pub subprocess: bool,
    pub role: Role,
    /// The helper's socket, in subprocess mode.
    pub socket: Option<PathBuf>,
    pub counters: Vec<(&'static str, u64)>,
}

pub fn status() -> Status {
    let st = state();
    let c = &COUNTERS;
    let h = &subprocess::COUNTERS;
    let mut counters: Vec<(&'static str, u64)> = c
        .all()
        .iter()
        .map(|(k, v)| (*k, v.load(Ordering::Relaxed)))
        .collect();
    counters.push(("socketpair_errors", st.pair_errors));
    counters.extend([
        ("helper_connects", h.connects.load(Ordering::Relaxed)),
        ("helper_starts", h.starts.load(Ordering::Relaxed)),
        (
            "helper_connect_errors",
            h.connect_errors.load(Ordering::Relaxed),
        ),
        ("helper_connections_lost", h.lost.load(Ordering::Relaxed)),
    ]);
    if let Some(l) = &st.listener {
        counters.extend(l.counter_list());
    } else {
        counters.push(("peers_refused", 0));
    }
    let client_up = st.role == Role::Client && client::current().is_some_and(|c| !c.is_broken());
    let subprocess = st.via_helper && st.role == Role::Client;
    Status {
        configured: st.mode,
        thread_mode: st.role == Role::Listener || (client_up && !subprocess),
        subprocess,
        role: st.role,
        socket: st
            .helper
            .as_ref()
            .filter(|_| subprocess)
            .map(|h| h.paths.socket.clone()),
        counters,
    }
}

/// Test-only: makes every listener of this process stop (or resume)
/// reading, so its clients time out and send direct.
pub fn test_stall(on: bool) {
    listener::STALL.store(on, Ordering::Relaxed);
}
