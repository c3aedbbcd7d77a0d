//! Where a per-user helper (subprocess mode) and its clients meet, and the
//! checks that make that place safe. Shared by the host (the gem, which
//! connects and starts the helper) and the helper binary (which binds).
//!
//! - The directory: `$XDG_RUNTIME_DIR/exporter/` when that variable holds
//!   an absolute path, else `<temp dir>/exporter-<uid>/`. It is created
//!   0700 and verified on every start and every connect ([`verify_dir`]):
//!   a directory (not a symlink: `lstat`), owned by our effective uid,
//!   mode exactly 0700. Anything else is refused: a directory someone else
//!   made first (in a shared `/tmp`) makes us run direct, never talk
//!   through it.
//! - The socket: `sidecar-<gem version>.sock` in it, so helpers of two gem
//!   versions never meet (the version is checked again in the handshake).
//!   `EXPORTER_SIDECAR_SOCKET` may name another path; its directory is held
//!   to the same rules.
//! - Beside the socket: `<socket>.lock` (the helper holds an exclusive
//!   `flock` on it for its whole life: exactly one helper wins a start
//!   race) and `<socket>.log` (the helper's stderr).
//! - [`connect`] never blocks: a helper whose backlog is full is "busy",
//!   not stale. Only a refused or missing socket is stale.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Exit status of the helper's launcher: it started a helper, whose socket
/// listens now.
pub const EXIT_STARTED: i32 = 0;
/// Exit status of the helper's launcher: another helper holds the lock and
/// answers on the socket.
pub const EXIT_RUNNING: i32 = 3;

/// The longest socket path `bind` takes (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why the rendezvous cannot be used.
#[derive(Debug)]
pub enum RendezvousError {
    /// `mkdir` or `lstat` of the directory failed.
    Io {
        path: PathBuf,
        source: io::Error,
    },
    /// The path is a symlink (it could point anywhere).
    Symlink(PathBuf),
    NotADirectory(PathBuf),
    /// Owned by another user.
    Owner {
        path: PathBuf,
        uid: u32,
        ours: u32,
    },
    /// Open to others (or not usable by us).
    Mode {
        path: PathBuf,
        mode: u32,
    },
    /// Longer than a Unix socket address holds.
    PathTooLong(PathBuf),
    /// A socket path with no directory.
    NoDirectory(PathBuf),
}

impl std::fmt::Display for RendezvousError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RendezvousError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            RendezvousError::Symlink(p) => write!(f, "{} is a symlink: refused", p.display()),
            RendezvousError::NotADirectory(p) => write!(f, "{} is not a directory", p.display()),
            RendezvousError::Owner { path, uid, ours } => write!(
                f,
                "{} is owned by uid {uid}, not by us ({ours}): refused",
                path.display()
            ),
            RendezvousError::Mode { path, mode } => {
                write!(f, "{} has mode {mode:o}, not 700: refused", path.display())
            }
            RendezvousError::PathTooLong(p) => write!(
                f,
                "{} is longer than a Unix socket path may be ({MAX_SOCKET_PATH} bytes)",
                p.display()
            ),
            RendezvousError::NoDirectory(p) => {
                write!(f, "{} has no directory", p.display())
            }
        }
    }
}

impl std::error::Error for RendezvousError {}

/// The files of one rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub lock: PathBuf,
    pub log: PathBuf,
}

/// `<socket>` + `suffix`.
fn beside(socket: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = socket.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl Paths {
    /// The rendezvous of a socket at `socket`.
    pub fn for_socket(socket: &Path) -> Result<Paths, RendezvousError> {
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(RendezvousError::PathTooLong(socket.to_owned()));
        }
        let dir = socket
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .ok_or_else(|| RendezvousError::NoDirectory(socket.to_owned()))?;
        Ok(Paths {
            dir: dir.to_owned(),
            socket: socket.to_owned(),
            lock: beside(socket, ".lock"),
            log: beside(socket, ".log"),
        })
    }

    /// The default rendezvous of this user and gem version.
    pub fn default_for(gem_version: &str) -> Result<Paths, RendezvousError> {
        Paths::for_socket(&default_dir().join(socket_name(gem_version)))
    }
}

/// The per-user directory, from the environment (see the module doc).
pub fn default_dir() -> PathBuf {
    dir_from(std::env::var_os("XDG_RUNTIME_DIR"), super::peer::our_uid())
}

fn dir_from(xdg: Option<OsString>, uid: u32) -> PathBuf {
    match xdg.map(PathBuf::from) {
        Some(x) if x.is_absolute() => x.join("exporter"),
        _ => std::env::temp_dir().join(format!("exporter-{uid}")),
    }
}

/// The socket's file name for a gem version (anything but `[A-Za-z0-9.-]`
/// becomes `_`).
pub fn socket_name(gem_version: &str) -> String {
    let v: String = gem_version
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("sidecar-{v}.sock")
}

/// Checks that `dir` is ours alone: a real directory (not a symlink),
/// owned by our effective uid, mode 0700.
pub fn verify_dir(dir: &Path) -> Result<(), RendezvousError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|source| RendezvousError::Io {
        path: dir.to_owned(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(RendezvousError::Symlink(dir.to_owned()));
    }
    if !meta.is_dir() {
        return Err(RendezvousError::NotADirectory(dir.to_owned()));
    }
    let ours = super::peer::our_uid();
    if meta.uid() != ours {
        return Err(RendezvousError::Owner {
            path: dir.to_owned(),
            uid: meta.uid(),
            ours,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode != 0o700 {
        return Err(RendezvousError::Mode {
            path: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Creates `dir` 0700 if it is missing (its parent must exist), then
/// verifies it. An existing directory is never chmod-ed: if it is not
/// already right, it is refused.
pub fn ensure_dir(dir: &Path) -> Result<(), RendezvousError> {
    let io = |source| RendezvousError::Io {
        path: dir.to_owned(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            // The umask may have taken bits away; set exactly 0700 on the
            // directory we just made (lstat-verified below).
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    verify_dir(dir)
}

/// Connects to the socket at `path` without blocking: `WouldBlock` when
/// the listener's backlog is full (busy, alive); `ConnectionRefused` or
/// `NotFound` when nobody listens (stale or absent). The stream returned
/// is blocking and close-on-exec.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or with a NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() has no memory preconditions; the fd it returns is
    // owned by `fd` at once, so it is closed on every path below.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` lives on this frame for the call and `len` does not
    // exceed its size (checked above: bytes.len() < sun_path.len()).
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        // A non-blocking Unix connect fails with EAGAIN when the backlog
        // is full; it never returns EINPROGRESS.
        return Err(io::Error::last_os_error());
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Whether a failed [`connect`] means nobody listens there (a stale or
/// absent socket), as opposed to a busy or unreachable one.
pub fn is_stale(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
    )
}

/// An exclusive `flock` on a lock file, held while this value (or a copy
/// of its descriptor in a forked child) lives.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Takes the lock if nobody holds it; `Ok(None)` when someone does.
    /// The file is created 0600 if missing and never followed if a
    /// symlink.
    pub fn try_take(path: &Path) -> io::Result<Option<Lock>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        // SAFETY: flock only reads the fd, which `f` owns for the call.
        // The lock belongs to the open file description: it is released
        // when every fd referring to it is closed (so a forked child that
        // keeps its copy keeps the lock).
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(Lock { _file: f }));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

/// Turns a path from Ruby (bytes) into a `PathBuf`.
pub fn path_from_bytes(b: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "exporter-rdv-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_directory_comes_from_xdg_runtime_dir_or_the_temp_dir() {
        assert_eq!(
            dir_from(Some("/run/user/7".into()), 7),
            PathBuf::from("/run/user/7/exporter")
        );
        let fallback = std::env::temp_dir().join("exporter-7");
        assert_eq!(dir_from(None, 7), fallback);
        assert_eq!(dir_from(Some("relative".into()), 7), fallback);
        assert_eq!(socket_name("0.1.0"), "sidecar-0.1.0.sock");
        assert_eq!(socket_name("1/../x y"), "sidecar-1_.._x_y.sock");
        let p = Paths::for_socket(Path::new("/d/s.sock")).unwrap();
        assert_eq!(p.lock, PathBuf::from("/d/s.sock.lock"));
        assert_eq!(p.log, PathBuf::from("/d/s.sock.log"));
        assert!(matches!(
            Paths::for_socket(Path::new(&"/x".repeat(60))),
            Err(RendezvousError::PathTooLong(_))
        ));
    }

    #[test]
    fn a_directory_is_made_0700_and_anything_else_is_refused() {
        let base = tmp("dir");
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join("exporter");
        ensure_dir(&dir).unwrap();
        let mode = std::fs::symlink_metadata(&dir).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        ensure_dir(&dir).unwrap();

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            ensure_dir(&dir),
            Err(RendezvousError::Mode { mode: 0o755, .. })
        ));

        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(
            verify_dir(&link),
            Err(RendezvousError::Symlink(_))
        ));
        let file = base.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            verify_dir(&file),
            Err(RendezvousError::NotADirectory(_))
        ));
        assert!(matches!(
            verify_dir(&base.join("missing")),
            Err(RendezvousError::Io { .. })
        ));
        if super::super::peer::our_uid() == 0 {
            let theirs = base.join("theirs");
            ensure_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            assert!(matches!(
                verify_dir(&theirs),
                Err(RendezvousError::Owner { uid: 65534, .. })
            ));
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn one_lock_holder_at_a_time() {
        let base = tmp("lock");
        ensure_dir(&base).unwrap();
        let path = base.join("s.sock.lock");
        let first = Lock::try_take(&path).unwrap();
        assert!(first.is_some());
        // Another open file description of the same file: refused.
        assert!(Lock::try_take(&path).unwrap().is_none());
        drop(first);
        assert!(Lock::try_take(&path).unwrap().is_some());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn connect_tells_stale_from_live() {
        let base = tmp("connect");
        ensure_dir(&base).unwrap();
        let path = base.join("s.sock");
        let e = connect(&path).unwrap_err();
        assert!(is_stale(&e), "{e}");
        let l = UnixListener::bind(&path).unwrap();
        let c = connect(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(
            super::super::peer::peer_cred(&s).unwrap().pid as u32,
            std::process::id()
        );
        drop((c, s));
        drop(l);
        // The file is left behind by a listener that went away: stale.
        let e = connect(&path).unwrap_err();
        assert!(is_stale(&e), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
