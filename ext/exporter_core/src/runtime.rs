//! The process-wide tokio runtime and its fork lifecycle.
//!
//! One runtime serves every transport and background worker of the process.
//! It starts lazily on first use, so a process that only loads the gem pays
//! no thread. Around `fork` (driven from Ruby's at_fork hooks):
//!
//! - [`before_fork`] shuts the runtime down: at the moment of fork no thread
//!   of ours is alive and no lock of ours is held by one;
//! - [`after_fork_parent`] lets the next use start a new runtime (and
//!   restarts registered background workers);
//! - [`after_fork_child`] does the same in the child, and if the parent's
//!   runtime was somehow still there (a fork that bypassed the hooks), it is
//!   leaked, never dropped or joined: its threads do not exist in the child
//!   and dropping it could wait on them forever.
//!
//! Every runtime gets a new *generation*; objects bound to a runtime (pooled
//! connections) compare generations and never cross from one to the next.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::runtime::{Builder, Handle, Runtime};

/// Why the runtime cannot be used right now.
#[derive(Debug)]
pub enum RuntimeError {
    /// Between `before_fork` and `after_fork_*`.
    ForkInProgress,
    /// The OS refused to start its threads.
    Start(std::io::Error),
}

impl std::fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuntimeError::ForkInProgress => f.write_str("a fork is in progress"),
            RuntimeError::Start(e) => write!(f, "cannot start the exporter runtime: {e}"),
        }
    }
}

impl std::error::Error for RuntimeError {}

struct State {
    runtime: Option<Runtime>,
    forking: bool,
}

/// Name of every thread the runtime starts.
pub const THREAD_NAME: &str = "exporter-rt";

static STATE: Mutex<State> = Mutex::new(State {
    runtime: None,
    forking: false,
});

/// Incremented whenever a new runtime starts.
static GENERATION: AtomicU64 = AtomicU64::new(0);

fn lock() -> MutexGuard<'static, State> {
    // A panic while holding this lock leaves the state consistent (each
    // field is written once), so poisoning is ignored.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The running runtime's handle and generation, starting it if needed.
pub fn handle() -> Result<(Handle, u64), RuntimeError> {
    let mut st = lock();
    if st.forking {
        return Err(RuntimeError::ForkInProgress);
    }
    if let Some(rt) = &st.runtime {
        return Ok((rt.handle().clone(), GENERATION.load(Ordering::Acquire)));
    }
    let rt = Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(4)
        .thread_name(THREAD_NAME)
        .enable_all()
        .build()
        .map_err(RuntimeError::Start)?;
    let handle = rt.handle().clone();
    st.runtime = Some(rt);
    let generation = GENERATION.fetch_add(1, Ordering::AcqRel) + 1;
    drop(st);
    crate::worker::on_runtime_start(&handle);
    Ok((handle, generation))
}

/// The generation of the current (or last) runtime.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// Whether `before_fork` ran and neither `after_fork_*` has yet: true
/// outside a fork only if an exception cut the parent's hooks short.
pub fn fork_in_progress() -> bool {
    lock().forking
}

/// Whether a runtime is running now.
pub fn is_running() -> bool {
    lock().runtime.is_some()
}

/// Threads of our runtime alive in this process (read from
/// `/proc/self/task`; 0 where that does not exist).
pub fn thread_count() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .map(|c| c.starts_with(THREAD_NAME))
                .unwrap_or(false)
        })
        .count()
}

/// Stops the runtime so that no thread of ours is alive at fork time.
/// Background workers are asked to pause first, so they can park their
/// state where the runtime's shutdown will not drop it.
pub fn before_fork() {
    crate::worker::pause_all();
    let rt = {
        let mut st = lock();
        st.forking = true;
        st.runtime.take()
    };
    if let Some(rt) = rt {
        // Worker threads are joined; a blocking task stuck in the OS (a DNS
        // lookup) is abandoned after the timeout rather than hanging fork.
        rt.shutdown_timeout(Duration::from_millis(500));
    }
}

/// Undoes `before_fork` in the parent (also when the fork failed).
pub fn after_fork_parent() {
    lock().forking = false;
    crate::worker::resume_all(false);
}

/// Starts afresh in a child. Whatever the parent's runtime owned is leaked.
pub fn after_fork_child() {
    start_over(true);
}

/// Starts afresh in the process that continues after `Process.daemon`:
/// as in a child, nothing of the old runtime is touched, but the parent
/// has exited, so background workers keep what they held and send it.
pub fn after_daemon() {
    start_over(false);
}

fn start_over(in_child: bool) {
    let inherited = {
        let mut st = lock();
        st.forking = false;
        st.runtime.take()
    };
    if let Some(rt) = inherited {
        std::mem::forget(rt);
    }
    GENERATION.fetch_add(1, Ordering::AcqRel);
    crate::worker::resume_all(in_child);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Serialises tests that drive the process-wide lifecycle.
    pub(crate) static LIFECYCLE: Mutex<()> = Mutex::new(());

    pub(crate) fn our_threads() -> usize {
        thread_count()
    }

    /// Whether our threads are all gone within a second: a joined thread
    /// may still be listed in /proc for an instant while the kernel
    /// releases it (it runs no code of ours by then).
    pub(crate) fn no_threads_left() -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while our_threads() > 0 {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn before_fork_leaves_no_thread_and_runtime_restarts() {
        let _g = LIFECYCLE.lock().unwrap_or_else(|p| p.into_inner());
        let (h, gen1) = handle().unwrap();
        // A spawned task runs on a worker thread, so the thread has named
        // itself by the time it completes.
        assert_eq!(h.block_on(h.spawn(async { 1 + 1 })).unwrap(), 2);
        assert!(our_threads() >= 1);
        before_fork();
        assert!(no_threads_left());
        assert!(matches!(handle(), Err(RuntimeError::ForkInProgress)));
        after_fork_parent();
        let (h, gen2) = handle().unwrap();
        assert!(gen2 > gen1);
        assert_eq!(h.block_on(async { 3 }), 3);
    }
}
