//! The host's side of subprocess mode: reaching the per-user helper
//! (`exporter-sidecar`, a binary installed beside the extension), starting
//! it when it is not running, and reconnecting when it went away.
//!
//! It owns the connect / start / back-off cycle and nothing of the
//! protocol: a connection it makes becomes a [`Client`], the same one
//! thread mode uses, and the sinks hand over through it as they do there.
//!
//! - Every connect verifies the rendezvous directory first (ours, 0700,
//!   not a symlink) and checks the helper's uid with `SO_PEERCRED` (ours,
//!   or root) once connected.
//! - The helper is started only when the socket is stale or absent (a
//!   refused connect), never when it is merely busy, and only by a process
//!   allowed to ([`HelperConfig::may_start`]). Starting runs the binary
//!   (posix_spawn: no Ruby fork hooks, no atfork handlers, an empty
//!   environment) and waits, bounded by [`LAUNCH_TIMEOUT`], for its
//!   launcher to exit: by then the helper's socket listens (or another
//!   helper won the race and listens).
//! - While no helper can be reached, attempts are spaced by a back-off
//!   (100 ms doubling to [`MAX_BACKOFF`]): a client whose helper died
//!   reconnects, or starts a new one, within that bound of its next
//!   flush, and sends direct meanwhile.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::client::Client;
use super::rendezvous::{self, Paths, RendezvousError};
use crate::log::ProblemLog;

/// How long a launcher may take to have the helper listening.
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait between two attempts to reach the helper.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Between two looks for a running helper in `auto` mode.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(2);

/// Where this process's helper is and how to start it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperConfig {
    pub paths: Paths,
    /// `EXPORTER_SIDECAR_SOCKET` named the socket.
    pub explicit: bool,
    /// The helper binary; `None` when it is not installed.
    pub binary: Option<PathBuf>,
    /// Seconds with no client after which the helper exits (`None`: its
    /// default).
    pub idle_seconds: Option<u64>,
    pub gem_version: String,
}

/// Counters of this process's helper connection.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections made to a helper for handovers.
    pub connects: AtomicU64,
    /// Helpers this process started (launchers that reported a new helper).
    pub starts: AtomicU64,
    /// Attempts that reached no helper (the process sent direct meanwhile).
    pub connect_errors: AtomicU64,
    /// Connections to a helper that broke after being up (helper killed,
    /// exited, or stopped answering).
    pub lost: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    connects: AtomicU64::new(0),
    starts: AtomicU64::new(0),
    connect_errors: AtomicU64::new(0),
    lost: AtomicU64::new(0),
};

/// Why no helper could be reached.
#[derive(Debug)]
pub enum ConnectError {
    Rendezvous(RendezvousError),
    /// Connecting failed (and the helper was not, or could not be, started).
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The process at the socket runs as another user.
    Peer(super::peer::PeerError),
    /// Starting the helper failed.
    Start(StartError),
}

/// Why the helper could not be started.
#[derive(Debug)]
pub enum StartError {
    /// The binary is not installed beside the extension.
    NoBinary,
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    /// The launcher exited with another status (its reason is in the log).
    Exit { status: String, log: PathBuf },
    /// The launcher did not finish within [`LAUNCH_TIMEOUT`] (killed).
    Timeout,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Rendezvous(e) => write!(f, "sidecar helper rendezvous: {e}"),
            ConnectError::Connect { path, source } => {
                write!(
                    f,
                    "cannot connect to the sidecar helper at {}: {source}",
                    path.display()
                )
            }
            ConnectError::Peer(e) => write!(f, "sidecar helper: {e}"),
            ConnectError::Start(e) => write!(f, "cannot start the sidecar helper: {e}"),
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::NoBinary => f.write_str("exporter-sidecar is not installed with the gem"),
            StartError::Spawn { binary, source } => write!(f, "{}: {source}", binary.display()),
            StartError::Exit { status, log } => {
                write!(
                    f,
                    "its launcher exited with {status} (see {})",
                    log.display()
                )
            }
            StartError::Timeout => write!(
                f,
                "its launcher did not finish within {} s",
                LAUNCH_TIMEOUT.as_secs()
            ),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Connects to the helper, starting it first when its socket is stale or
/// absent and `may_start`.
pub fn connect(cfg: &HelperConfig, may_start: bool) -> Result<Client, ConnectError> {
    let dir = &cfg.paths.dir;
    let checked = if may_start {
        rendezvous::ensure_dir(dir)
    } else {
        rendezvous::verify_dir(dir)
    };
    checked.map_err(ConnectError::Rendezvous)?;
    let stream = match rendezvous::connect(&cfg.paths.socket) {
        Ok(s) => s,
        Err(e) if may_start && rendezvous::is_stale(&e) => {
            start(cfg).map_err(ConnectError::Start)?;
            rendezvous::connect(&cfg.paths.socket).map_err(|source| ConnectError::Connect {
                path: cfg.paths.socket.clone(),
                source,
            })?
        }
        Err(source) => {
            return Err(ConnectError::Connect {
                path: cfg.paths.socket.clone(),
                source,
            })
        }
    };
    super::peer::check(&stream).map_err(ConnectError::Peer)?;
    Ok(Client::new(stream, &cfg.gem_version))
}

/// Runs the helper's launcher and waits for it (bounded). Ok once a
/// helper listens: this one, or another that won the race.
pub fn start(cfg: &HelperConfig) -> Result<(), StartError> {
    let binary = cfg.binary.as_ref().ok_or(StartError::NoBinary)?;
    if !binary.is_file() {
        return Err(StartError::NoBinary);
    }
    let mut cmd = Command::new(binary);
    cmd.arg("--socket")
        .arg(&cfg.paths.socket)
        .arg("--gem-version")
        .arg(&cfg.gem_version);
    if let Some(s) = cfg.idle_seconds {
        cmd.arg("--idle-seconds").arg(s.to_string());
    }
    // No pre_exec, uid or gid: std spawns with posix_spawn (no fork
    // handlers of the host run in between). Nothing of the host's
    // environment or stdio goes along; the helper closes any other fd it
    // inherited.
    cmd.env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().map_err(|source| StartError::Spawn {
        binary: binary.clone(),
        source,
    })?;
    let deadline = Instant::now() + LAUNCH_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return match status.code() {
                    Some(rendezvous::EXIT_STARTED) => {
                        COUNTERS.starts.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Some(rendezvous::EXIT_RUNNING) => Ok(()),
                    _ => Err(StartError::Exit {
                        status: status.to_string(),
                        log: cfg.paths.log.clone(),
                    }),
                };
            }
            Ok(None) => {}
            // Reaped by someone else (a server that waits for any child):
            // the connect that follows tells whether a helper listens.
            Err(_) => return Ok(()),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StartError::Timeout);
        }
        // The launcher exits within milliseconds (bind, fork, exit).
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The reconnect schedule of this process.
struct Schedule {
    /// No attempt before this.
    next: Option<Instant>,
    backoff: Duration,
}

static SCHEDULE: Mutex<Schedule> = Mutex::new(Schedule {
    next: None,
    backoff: MIN_BACKOFF,
});

static LOG: ProblemLog = ProblemLog::new("sidecar helper");

fn schedule() -> MutexGuard<'static, Schedule> {
    SCHEDULE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why [`reconnect`] did not try.
pub const WAITING: &str = "waiting before the next attempt to reach the helper";

/// Whether the schedule allows an attempt now (a cheap check before the
/// blocking [`reconnect`]).
pub fn due() -> bool {
    schedule().next.is_none_or(|t| Instant::now() >= t)
}

/// What [`reconnect`] found.
pub enum Reconnect {
    Connected(Arc<Client>),
    /// Not yet time for another attempt, or the attempt failed (logged,
    /// counted): send direct.
    Unavailable(String),
}

/// One attempt to reach the helper, if the schedule allows it now.
/// Serialised: concurrent callers wait for the attempt in progress and
/// then find it too early for theirs. `discovering` (auto mode): only an
/// already-running helper is used, failures are neither logged nor
/// counted, and attempts are spaced by [`DISCOVERY_INTERVAL`].
pub fn reconnect(cfg: &HelperConfig, may_start: bool, discovering: bool) -> Reconnect {
    let mut sch = schedule();
    let now = Instant::now();
    if sch.next.is_some_and(|t| now < t) {
        return Reconnect::Unavailable(
            "waiting before the next attempt to reach the helper".into(),
        );
    }
    match connect(cfg, may_start) {
        Ok(c) => {
            COUNTERS.connects.fetch_add(1, Ordering::Relaxed);
            sch.next = None;
            sch.backoff = MIN_BACKOFF;
            LOG.outcome(None);
            Reconnect::Connected(Arc::new(c))
        }
        Err(e) => {
            let wait = if discovering {
                DISCOVERY_INTERVAL
            } else {
                COUNTERS.connect_errors.fetch_add(1, Ordering::Relaxed);
                LOG.outcome(Some(&format!("{e}; sending direct meanwhile")));
                let w = sch.backoff;
                sch.backoff = (sch.backoff * 2).min(MAX_BACKOFF);
                w
            };
            sch.next = Some(now + wait);
            Reconnect::Unavailable(e.to_string())
        }
    }
}

/// In a forked child: a fresh schedule and zeroed counters (the parent's
/// connection is not ours).
pub fn after_fork_child() {
    *schedule() = Schedule {
        next: None,
        backoff: MIN_BACKOFF,
    };
    LOG.reset();
    for c in [
        &COUNTERS.connects,
        &COUNTERS.starts,
        &COUNTERS.connect_errors,
        &COUNTERS.lost,
    ] {
        c.store(0, Ordering::Relaxed);
    }
}

/// Asks the helper at `socket` for its status (JSON), on a connection of
/// its own; never starts one.
pub fn query_status(cfg: &HelperConfig) -> Result<String, String> {
    let c = connect(cfg, false).map_err(|e| e.to_string())?;
    let bytes = c.status().map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|_| "status is not UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &std::path::Path, binary: Option<PathBuf>) -> HelperConfig {
        HelperConfig {
            paths: Paths::for_socket(&dir.join("s.sock")).unwrap(),
            explicit: false,
            binary,
            idle_seconds: None,
            gem_version: "0.1.0".into(),
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("exporter-sub-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn no_helper_and_no_binary_is_an_error_that_says_why() {
        let d = tmp("nobin");
        let c = cfg(&d, None);
        let e = connect(&c, false).err().unwrap();
        assert!(matches!(e, ConnectError::Rendezvous(_)), "{e}");
        let e = connect(&c, true).err().unwrap();
        assert!(
            matches!(e, ConnectError::Start(StartError::NoBinary)),
            "{e}"
        );
        // The directory was made, 0700.
        rendezvous::verify_dir(&d).unwrap();
        let e = connect(&c, false).err().unwrap();
        assert!(
            matches!(&e, ConnectError::Connect { source, .. } if rendezvous::is_stale(source)),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn attempts_are_spaced_by_a_doubling_back_off_and_counted() {
        let d = tmp("backoff");
        let c = cfg(&d, None);
        after_fork_child();
        let errors = || COUNTERS.connect_errors.load(Ordering::SeqCst);
        assert!(due());
        assert!(matches!(reconnect(&c, false, false), Reconnect::Unavailable(w) if w != WAITING));
        assert_eq!(errors(), 1);
        assert!(!due());
        assert!(matches!(reconnect(&c, false, false), Reconnect::Unavailable(w) if w == WAITING));
        assert_eq!(errors(), 1, "a skipped attempt is not an error");
        let mut waits = Vec::new();
        for _ in 0..2 {
            let failed = Instant::now();
            while !due() {
                assert!(failed.elapsed() < MAX_BACKOFF * 2, "never due again");
                std::thread::sleep(Duration::from_millis(5));
            }
            waits.push(failed.elapsed());
            assert!(matches!(
                reconnect(&c, false, false),
                Reconnect::Unavailable(_)
            ));
        }
        assert!(waits[0] >= MIN_BACKOFF, "{waits:?}");
        assert!(waits[1] >= MIN_BACKOFF * 2, "{waits:?}");
        // Discovery (auto) failures are neither counted nor backed off.
        after_fork_child();
        assert!(matches!(
            reconnect(&c, false, true),
            Reconnect::Unavailable(_)
        ));
        assert_eq!(errors(), 0);
        assert!(!due());
        after_fork_child();
    }

    #[test]
    fn a_launcher_that_fails_is_reported_with_its_status() {
        let d = tmp("fail");
        let c = cfg(&d, Some(PathBuf::from("/bin/false")));
        let e = connect(&c, true).err().unwrap();
        assert!(
            matches!(&e, ConnectError::Start(StartError::Exit { status, .. }) if status.contains('1')),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
