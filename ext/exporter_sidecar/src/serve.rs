//! The daemon's life: accept connections from the named socket into the
//! thread-mode [`Listener`] (the same code, the same protocol, batching,
//! dedup, aggregation and limits), and end it well.
//!
//! - Every accepted connection goes to [`Listener::adopt`], which checks
//!   the peer with `SO_PEERCRED` (same uid or root; anything else closed
//!   and counted in `peers_refused`, one log line per distinct peer).
//! - Idle exit: once no client is connected and nothing is held (what was
//!   handed over was sent: with no client left, the senders are flushed
//!   at once) for the idle period, the helper stops accepting, removes
//!   its socket (it holds the lock, so the socket is its own), releases
//!   the lock and exits. A client that connects in that instant sees its
//!   connection closed before the handshake and sends direct; its next
//!   attempt starts a new helper.
//! - An agent that never comes back must not keep a helper forever: with
//!   no client for [`linger`] and still something held, it exits and logs
//!   what it drops.
//! - SIGTERM and SIGINT: the same steps at once, the last flush bounded by
//!   [`LAST_FLUSH`].

use std::os::unix::net::UnixListener as StdUnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exporter_core::sidecar::listener::{Limits, Listener};
use exporter_core::sidecar::rendezvous::{Lock, Paths};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

/// How long the last flush may take at exit.
pub const LAST_FLUSH: Duration = Duration::from_secs(5);

/// With no client for this long, a helper that still holds something
/// (agent unreachable) gives it up and exits.
pub fn linger(idle: Duration) -> Duration {
    (idle * 10).max(Duration::from_secs(600))
}

/// Why the daemon stopped serving.
#[derive(Debug)]
enum Stop {
    Idle(Duration),
    Signal(&'static str),
    GaveUp(Duration),
    Setup(std::io::Error),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Idle(d) => write!(f, "no client and nothing held for {} s", d.as_secs_f64()),
            Stop::Signal(s) => write!(f, "{s}"),
            Stop::GaveUp(d) => write!(
                f,
                "no client for {} s and the agent does not take what is held",
                d.as_secs()
            ),
            Stop::Setup(e) => write!(f, "cannot serve the socket: {e}"),
        }
    }
}

/// Serves until idle or signalled, then exits cleanly. Returns the exit
/// status.
pub fn run(
    socket: StdUnixListener,
    lock: Lock,
    paths: &Paths,
    gem_version: &str,
    idle: Duration,
) -> i32 {
    eprintln!(
        "exporter-sidecar: pid {} serving {} (gem {gem_version}; exits after {} s with no client)",
        std::process::id(),
        paths.socket.display(),
        idle.as_secs()
    );
    let handle = match exporter_core::runtime::handle() {
        Ok((h, _)) => h,
        Err(e) => {
            eprintln!("exporter-sidecar: {e}");
            return 1;
        }
    };
    let listener = Arc::new(Listener::new(gem_version, Limits::default()));
    if let Err(e) = exporter_core::worker::register(&listener) {
        eprintln!("exporter-sidecar: {e}");
        return 1;
    }
    let stop = handle.block_on(serve(listener.clone(), socket, idle));
    // The socket is ours (we hold the lock): remove it, then let the next
    // helper start while this one finishes.
    let _ = std::fs::remove_file(&paths.socket);
    drop(lock);
    let flushed = handle
        .block_on(async { tokio::time::timeout(LAST_FLUSH, listener.flush()).await })
        .unwrap_or(false);
    let (bodies, exposures, evaluations) = listener.pending();
    let left = if flushed {
        String::from("everything sent")
    } else {
        format!(
            "not sent, lost: {bodies} trace bodies, {exposures} exposures, {evaluations} flag evaluations"
        )
    };
    let c: Vec<String> = listener
        .counter_list()
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    eprintln!(
        "exporter-sidecar: pid {} exiting: {stop}; {left} ({})",
        std::process::id(),
        c.join(" ")
    );
    match stop {
        Stop::Setup(_) => 1,
        _ => 0,
    }
}

async fn serve(listener: Arc<Listener>, socket: StdUnixListener, idle: Duration) -> Stop {
    let socket = match socket
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(socket))
    {
        Ok(s) => s,
        Err(e) => return Stop::Setup(e),
    };
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => return Stop::Setup(e),
    };
    let mut tick =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let flushing = Arc::new(AtomicBool::new(false));
    // A helper nobody ever connects to exits too.
    let mut quiet_since = Some(Instant::now());
    let mut no_client_since = Some(Instant::now());
    let mut accept_error_logged = false;
    loop {
        tokio::select! {
            r = socket.accept() => match r.and_then(|(s, _)| s.into_std()) {
                Ok(s) => {
                    accept_error_logged = false;
                    quiet_since = None;
                    no_client_since = None;
                    listener.adopt(s);
                }
                Err(e) => {
                    if !accept_error_logged {
                        eprintln!("exporter-sidecar: accept: {e}");
                        accept_error_logged = true;
                    }
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = term.recv() => return Stop::Signal("SIGTERM"),
            _ = int.recv() => return Stop::Signal("SIGINT"),
            _ = tick.tick() => {
                let now = Instant::now();
                if listener.open_connections() > 0 {
                    quiet_since = None;
                    no_client_since = None;
                    continue;
                }
                let alone = *no_client_since.get_or_insert(now);
                let (b, x, e) = listener.pending();
                if b + x + e > 0 || listener.held_bytes() > 0 {
                    quiet_since = None;
                    if now.duration_since(alone) >= linger(idle) {
                        return Stop::GaveUp(linger(idle));
                    }
                    // No client will add to it: send it now rather than
                    // at the end of a window.
                    if !flushing.swap(true, Ordering::AcqRel) {
                        let f = listener.flush();
                        let done = flushing.clone();
                        tokio::spawn(async move {
                            let _ = f.await;
                            done.store(false, Ordering::Release);
                        });
                    }
                    continue;
                }
                let since = *quiet_since.get_or_insert(now);
                if now.duration_since(since) >= idle {
                    return Stop::Idle(idle);
                }
            }
        }
    }
}
