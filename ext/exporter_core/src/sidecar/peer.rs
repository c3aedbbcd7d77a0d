//! Who is at the other end of a Unix socket (`SO_PEERCRED`), and whether
//! the listener talks to them: the same uid as the listener, or root.
//! Anything else is closed and counted by the caller.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The credentials of a socket's peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Reads the peer's credentials. For a socketpair they are those of the
/// process that created the pair.
pub fn peer_cred(stream: &UnixStream) -> std::io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` live on this frame for the whole call, `len`
    // holds `cred`'s size, and the kernel writes at most `len` bytes into
    // it. The fd is owned by `stream`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "SO_PEERCRED returned a short ucred",
        ));
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// This process's effective uid.
pub fn our_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a peer with `peer_uid` may talk to a listener running as
/// `our_uid`.
pub fn allowed(peer_uid: u32, our_uid: u32) -> bool {
    peer_uid == our_uid || peer_uid == 0
}

/// Why a connection was refused before its handshake.
#[derive(Debug)]
pub enum PeerError {
    Unreadable(std::io::Error),
    OtherUser { uid: u32, pid: i32 },
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerError::Unreadable(e) => write!(f, "cannot read the peer's credentials: {e}"),
            PeerError::OtherUser { uid, pid } => {
                write!(f, "peer pid {pid} runs as uid {uid}, not ours: refused")
            }
        }
    }
}

/// Checks the peer of `stream` against this process's uid.
pub fn check(stream: &UnixStream) -> Result<PeerCred, PeerError> {
    let cred = peer_cred(stream).map_err(PeerError::Unreadable)?;
    if !allowed(cred.uid, our_uid()) {
        return Err(PeerError::OtherUser {
            uid: cred.uid,
            pid: cred.pid,
        });
    }
    Ok(cred)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socketpair_peer_is_this_process() {
        let (a, b) = UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        assert_eq!(cred.pid as u32, std::process::id());
        assert_eq!(cred.uid, our_uid());
        assert!(check(&b).is_ok());
    }

    #[test]
    fn only_the_same_uid_or_root_is_allowed() {
        assert!(allowed(1000, 1000));
        assert!(allowed(0, 1000));
        assert!(allowed(0, 0));
        assert!(!allowed(1001, 1000));
        assert!(!allowed(1000, 0));
    }

    #[test]
    fn a_named_socket_peer_is_read_on_accept() {
        let dir = std::env::temp_dir().join(format!("exporter-peer-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let l = std::os::unix::net::UnixListener::bind(&dir).unwrap();
        let c = UnixStream::connect(&dir).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(peer_cred(&s).unwrap().uid, our_uid());
        drop(c);
        let _ = std::fs::remove_file(&dir);
    }
}
