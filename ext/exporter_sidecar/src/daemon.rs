//! Becoming a daemon, cleanly: the process-level steps the helper takes
//! before it serves, each one small and with its invariant stated.
//!
//! - [`close_inherited_fds`]: first thing in `main`, every descriptor
//!   above stderr is closed, whatever the host leaked to us (Ruby marks
//!   its own close-on-exec; a C extension may not).
//! - [`log_to`]: stderr becomes the log file in the rendezvous directory,
//!   so every line the helper (and `exporter_core`'s problem logs) prints
//!   lands there.
//! - [`detach`]: fork once more; the launcher (the host's child) exits at
//!   once and is reaped by the host, the daemon starts its own session
//!   (`setsid`: no controlling terminal, no signal of the host's process
//!   group) with stdin and stdout on `/dev/null`. Its parent is then init
//!   (or the nearest subreaper), which reaps it when it exits.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Closes every descriptor above 2.
///
/// Call it before anything in this process opened a file: no Rust value
/// owns a descriptor above 2 yet, so nothing is closed under its owner.
pub fn close_inherited_fds() {
    // SAFETY: close_range only closes descriptors; by the invariant above
    // none of them is owned by anything in this process.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc == 0 {
        return;
    }
    // Kernels before 5.9: read the list, then close each one.
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd > 2)
            .collect(),
        Err(_) => (3..1024).collect(),
    };
    for fd in fds {
        // SAFETY: as above; the directory's own fd is closed already
        // (EBADF, ignored).
        unsafe { libc::close(fd) };
    }
}

/// Makes stderr the log file at `path` (appended, 0600, never a symlink).
/// A log over 1 MiB is started afresh.
pub fn log_to(path: &Path) -> io::Result<()> {
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if f.metadata()?.len() > 1024 * 1024 {
        f.set_len(0)?;
    }
    redirect(f.as_raw_fd(), libc::STDERR_FILENO)
}

/// Points `target` (0, 1 or 2) at the file of `fd`.
fn redirect(fd: i32, target: i32) -> io::Result<()> {
    // SAFETY: dup2 replaces `target`, one of the standard descriptors,
    // which std treats as always open and never owns; `fd` stays valid
    // for the call (its owner outlives it).
    if unsafe { libc::dup2(fd, target) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Which side of [`detach`] we are on.
#[derive(Debug, PartialEq, Eq)]
pub enum Side {
    /// The launcher: report and exit.
    Launcher,
    /// The daemon: serve.
    Daemon,
}

/// Forks the daemon off (see the module doc).
///
/// Call it while this process has one thread (no runtime started yet): a
/// forked child of a multi-threaded process may only call
/// async-signal-safe functions, and the daemon goes on to do anything.
pub fn detach() -> io::Result<Side> {
    // SAFETY: single-threaded here (the invariant above), so the child is
    // a full copy with no lock held by a thread that does not exist in it.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // SAFETY: setsid has no memory preconditions; it fails only
            // for a process group leader, which a fresh child is not.
            if unsafe { libc::setsid() } < 0 {
                return Err(io::Error::last_os_error());
            }
            let null = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/null")?;
            redirect(null.as_raw_fd(), libc::STDIN_FILENO)?;
            redirect(null.as_raw_fd(), libc::STDOUT_FILENO)?;
            std::env::set_current_dir("/")?;
            // SAFETY: umask only sets the process's file mode mask.
            unsafe { libc::umask(0o077) };
            Ok(Side::Daemon)
        }
        _ => Ok(Side::Launcher),
    }
}
