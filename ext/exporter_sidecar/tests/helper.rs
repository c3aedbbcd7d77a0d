//! The built `exporter-sidecar` binary, run as the gem runs it: launcher
//! exit statuses, one winner of a start race (flock), the daemon's
//! session and descriptors (fork, setsid, close_range), the status
//! request, idle exit and SIGTERM (reaped here: this test process makes
//! itself the subreaper of what it starts), a stale socket replaced.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use exporter_core::sidecar::client::Client;
use exporter_core::sidecar::rendezvous::{self, EXIT_RUNNING, EXIT_STARTED};

const BIN: &str = env!("CARGO_BIN_EXE_exporter-sidecar");
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integers only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0);
}

fn tmp(name: &str) -> PathBuf {
    let base = std::env::temp_dir().join(format!("exporter-helper-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    base.join("exporter")
}

fn launch(socket: &Path, idle: u64) -> i32 {
    Command::new(BIN)
        .args(["--socket".as_ref(), socket.as_os_str()])
        .args([
            "--gem-version",
            VERSION,
            "--idle-seconds",
            &idle.to_string(),
        ])
        .env_clear()
        .status()
        .unwrap()
        .code()
        .unwrap()
}

fn status(socket: &Path) -> serde_json::Value {
    let c = Client::new(rendezvous::connect(socket).unwrap(), VERSION);
    serde_json::from_slice(&c.status().unwrap()).unwrap()
}

/// Waits (bounded) for `pid`, a child of ours as subreaper; its status.
fn reap(pid: i32, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        let mut st = 0;
        // SAFETY: waitpid writes the status into `st`, on this frame.
        let rc = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if rc == pid {
            return st;
        }
        if Instant::now() > deadline {
            // SAFETY: kill takes integers only.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("helper {pid} did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn fields(pid: i32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: state ppid pgrp session ...
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').map(str::to_owned).collect()
}

#[test]
fn one_helper_per_socket_detached_with_no_inherited_descriptor_and_idle_exit() {
    subreaper();
    let dir = tmp("life");
    let socket = dir.join(rendezvous::socket_name(VERSION));
    // A descriptor the host leaks (not close-on-exec).
    let marker = dir.parent().unwrap().join("marker");
    std::fs::write(&marker, b"").unwrap();
    let path = CString::new(marker.to_str().unwrap()).unwrap();
    // SAFETY: open with a valid C string; the fd is closed below.
    let leaked = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
    assert!(leaked > 2);

    let codes: Vec<i32> = {
        let mut children: Vec<_> = (0..20)
            .map(|_| {
                Command::new(BIN)
                    .args(["--socket".as_ref(), socket.as_os_str()])
                    .args(["--gem-version", VERSION, "--idle-seconds", "1"])
                    .env_clear()
                    .spawn()
                    .unwrap()
            })
            .collect();
        children
            .iter_mut()
            .map(|c| c.wait().unwrap().code().unwrap())
            .collect()
    };
    // SAFETY: our own fd, opened above.
    unsafe { libc::close(leaked) };
    assert_eq!(
        codes.iter().filter(|c| **c == EXIT_STARTED).count(),
        1,
        "{codes:?}"
    );
    assert_eq!(codes.iter().filter(|c| **c == EXIT_RUNNING).count(), 19);
    assert_eq!(launch(&socket, 1), EXIT_RUNNING);
    let meta = std::fs::symlink_metadata(&dir).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700);

    let s = status(&socket);
    let pid = s["pid"].as_i64().unwrap() as i32;
    assert_eq!(s["gem_version"], VERSION);
    let f = fields(pid);
    assert_eq!(f[1], std::process::id().to_string(), "reparented to us");
    assert_eq!(f[3], pid.to_string(), "its own session");
    let log = socket.with_extension("sock.log");
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = fd.unwrap();
        let target = std::fs::read_link(fd.path()).unwrap();
        let t = target.to_string_lossy();
        assert!(target != marker, "inherited {}", marker.display());
        let expected = t == "/dev/null"
            || target == log
            || target == socket.with_extension("sock.lock")
            || t.starts_with("socket:[")
            || t.starts_with("anon_inode:");
        assert!(expected, "fd {:?} -> {t}", fd.file_name());
    }
    let started = std::fs::read_to_string(&log).unwrap();
    assert_eq!(started.matches("serving").count(), 1, "{started}");

    // Idle: no client for 1 s, nothing held.
    let st = reap(pid, Duration::from_secs(10));
    assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0, "{st}");
    assert!(!socket.exists(), "socket removed at exit");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("exiting: no client and nothing held"), "{log}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn a_stale_socket_is_replaced_and_sigterm_ends_it_cleanly() {
    subreaper();
    let dir = tmp("stale");
    rendezvous::ensure_dir(&dir).unwrap();
    let socket = dir.join(rendezvous::socket_name(VERSION));
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    assert_eq!(launch(&socket, 60), EXIT_STARTED);
    let pid = status(&socket)["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill takes integers only.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let st = reap(pid, Duration::from_secs(10));
    assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0, "{st}");
    let log = std::fs::read_to_string(socket.with_extension("sock.log")).unwrap();
    assert!(log.contains("replacing the stale socket"), "{log}");
    assert!(log.contains("exiting: SIGTERM; everything sent"), "{log}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn refuses_a_directory_open_to_others_and_another_gem_version() {
    let dir = tmp("refuse");
    rendezvous::ensure_dir(&dir).unwrap();
    let socket = dir.join("s.sock");
    let other = Command::new(BIN)
        .args(["--socket".as_ref(), socket.as_os_str()])
        .args(["--gem-version", "0.0.0-other"])
        .status()
        .unwrap();
    assert_eq!(other.code(), Some(1));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(launch(&socket, 1), 1);
    assert!(!socket.exists());
    let usage = Command::new(BIN).arg("--what").status().unwrap();
    assert_eq!(usage.code(), Some(64));
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}
