//! `exporter-sidecar`: the per-user helper of the exporter gem's
//! subprocess mode (README, "Sidecar"). Built and installed with the gem,
//! beside its extension; started by the gem (never by hand) as
//! `exporter-sidecar --socket PATH --gem-version V [--idle-seconds N]`.
//!
//! The process the host starts is a *launcher*: it verifies the
//! rendezvous directory, takes the lock (or finds the helper that holds
//! it answering, and exits [`EXIT_RUNNING`]), replaces a stale socket,
//! binds, forks the daemon and exits [`EXIT_STARTED`]: when the host sees
//! it exit, the socket listens. The daemon serves the thread-mode
//! listener's protocol until it is idle ([`serve`]).
//!
//! - [`args`]: the command line;
//! - [`daemon`]: descriptors, log, fork and session;
//! - [`serve`]: accepting, idle exit, signals.

mod args;
mod daemon;
mod serve;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use exporter_core::sidecar::rendezvous::{
    self, Lock, Paths, RendezvousError, EXIT_RUNNING, EXIT_STARTED,
};

/// This helper's gem version: it serves hosts of this version only.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long a launcher waits for the lock while another helper starts or
/// exits.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Why the launcher could not start a helper.
#[derive(Debug)]
enum LaunchError {
    Version(String),
    Rendezvous(RendezvousError),
    Io(&'static str, std::io::Error),
    /// The lock stayed taken and nobody answered on the socket.
    LockTimeout,
    /// Holding the lock, the socket is there and neither answers nor is
    /// stale (its backlog is full, say): left alone.
    SocketBusy(std::io::Error),
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LaunchError::Version(v) => write!(
                f,
                "this helper is gem version {VERSION}, the host is {v}: not started"
            ),
            LaunchError::Rendezvous(e) => write!(f, "{e}"),
            LaunchError::Io(what, e) => write!(f, "{what}: {e}"),
            LaunchError::LockTimeout => write!(
                f,
                "the lock stayed taken for {} s and no helper answered",
                LOCK_WAIT.as_secs()
            ),
            LaunchError::SocketBusy(e) => {
                write!(
                    f,
                    "the socket is there and neither answers nor is stale: {e}"
                )
            }
        }
    }
}

fn main() -> ExitCode {
    // Before anything here opens a file (daemon::close_inherited_fds).
    daemon::close_inherited_fds();
    let args = match args::Args::parse(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("exporter-sidecar: {e}");
            return ExitCode::from(64);
        }
    };
    match launch(&args) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("exporter-sidecar: not started: {e}");
            ExitCode::from(1)
        }
    }
}

fn launch(args: &args::Args) -> Result<i32, LaunchError> {
    if args.gem_version != VERSION {
        return Err(LaunchError::Version(args.gem_version.clone()));
    }
    let paths = Paths::for_socket(&args.socket).map_err(LaunchError::Rendezvous)?;
    rendezvous::ensure_dir(&paths.dir).map_err(LaunchError::Rendezvous)?;
    daemon::log_to(&paths.log).map_err(|e| LaunchError::Io("log file", e))?;
    let Some(lock) = take_lock(&paths)? else {
        return Ok(EXIT_RUNNING);
    };
    // Holding the lock, any socket here is a dead helper's, unless it
    // answers; it is replaced only after a failed connect.
    match rendezvous::connect(&paths.socket) {
        Ok(_) => return Ok(EXIT_RUNNING),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if rendezvous::is_stale(&e) => {
            eprintln!(
                "exporter-sidecar: replacing the stale socket {} ({e})",
                paths.socket.display()
            );
            std::fs::remove_file(&paths.socket)
                .map_err(|e| LaunchError::Io("removing the stale socket", e))?;
        }
        Err(e) => return Err(LaunchError::SocketBusy(e)),
    }
    let socket =
        UnixListener::bind(&paths.socket).map_err(|e| LaunchError::Io("binding the socket", e))?;
    std::fs::set_permissions(&paths.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| LaunchError::Io("socket permissions", e))?;
    match daemon::detach().map_err(|e| LaunchError::Io("detaching", e))? {
        // The launcher's copies of the socket and the lock close with it;
        // the daemon's keep both.
        daemon::Side::Launcher => Ok(EXIT_STARTED),
        daemon::Side::Daemon => {
            let code = serve::run(socket, lock, &paths, VERSION, args.idle);
            std::process::exit(code)
        }
    }
}

/// Takes the helper lock, waiting (bounded) while another launcher holds
/// it and its socket does not answer yet. `None`: another helper answers.
fn take_lock(paths: &Paths) -> Result<Option<Lock>, LaunchError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        if let Some(lock) =
            Lock::try_take(&paths.lock).map_err(|e| LaunchError::Io("lock file", e))?
        {
            return Ok(Some(lock));
        }
        if rendezvous::connect(&paths.socket).is_ok() {
            return Ok(None);
        }
        if Instant::now() >= deadline {
            return Err(LaunchError::LockTimeout);
        }
        // The holder binds within milliseconds of taking the lock (or
        // releases it within milliseconds of removing its socket).
        std::thread::sleep(Duration::from_millis(5));
    }
}
