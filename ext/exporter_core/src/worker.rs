//! Native background workers that take part in the fork lifecycle.
//!
//! A worker is a long-lived task on the shared runtime (the trace writer's
//! flusher, the flag-evaluation worker). Its state lives in the worker
//! object, not in the task, so the runtime can be shut down at fork without
//! losing anything:
//!
//! - `pause` (before fork): stop the task and wait, bounded, until it is idle;
//! - `resume(in_child = false)` (parent after fork): nothing to reset;
//! - `resume(in_child = true)`: reset state inherited from the parent (its
//!   queue belongs to the parent, which sends it);
//! - `start(handle)`: spawn the task on a new runtime; called whenever a
//!   runtime starts, and at registration if one is running.
//!
//! [`TaskControl`] is the part every sending worker shares: its task's
//! stop tokens, whether it runs, and `pause`'s bounded protocol.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// A background worker driven by the runtime lifecycle.
pub trait Worker: Send + Sync {
    /// Spawns the worker's task on `handle`.
    fn start(self: Arc<Self>, handle: &Handle);
    /// Stops the task before fork; must return in bounded time.
    fn pause(&self);
    /// Prepares to be started again after fork.
    fn resume(&self, in_child: bool);
}

static WORKERS: Mutex<Vec<Weak<dyn Worker>>> = Mutex::new(Vec::new());

fn live() -> Vec<Arc<dyn Worker>> {
    let mut list = WORKERS.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|w| w.strong_count() > 0);
    list.iter().filter_map(Weak::upgrade).collect()
}

/// Registers a worker and starts it on the runtime (starting the runtime if
/// needed). Dropping the last `Arc` unregisters it.
pub fn register<W: Worker + 'static>(worker: &Arc<W>) -> Result<(), crate::runtime::RuntimeError> {
    let worker: Arc<dyn Worker> = worker.clone();
    WORKERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::downgrade(&worker));
    let running = crate::runtime::is_running();
    let handle = match crate::runtime::handle() {
        Ok((handle, _)) => handle,
        // Registered while another thread forks (the fork hooks release
        // the GVL while they wait): started with the others after it.
        Err(crate::runtime::RuntimeError::ForkInProgress) => return Ok(()),
        Err(e) => return Err(e),
    };
    if running {
        // A runtime that was already up did not see this worker start.
        worker.clone().start(&handle);
    }
    Ok(())
}

pub(crate) fn on_runtime_start(handle: &Handle) {
    for w in live() {
        w.start(handle);
    }
}

pub(crate) fn pause_all() {
    for w in live() {
        w.pause();
    }
}

pub(crate) fn resume_all(in_child: bool) {
    let workers = live();
    for w in &workers {
        w.resume(in_child);
    }
    if !workers.is_empty() {
        // Start a runtime now so the workers run again without waiting for
        // the next send. An error here reappears, with context, at next use.
        let _ = crate::runtime::handle();
    }
}

/// How a worker's task is started, paused and stopped: the state the task
/// shares with the lifecycle, and `pause`'s protocol, for every worker
/// that sends (the batch flusher, the flag-evaluation worker).
///
/// `pause` first lets the attempt in flight finish (up to the sink's
/// attempt timeout plus [`PAUSE_MARGIN`]) with no retry after it, so what
/// it carries is neither cut off mid-request nor sent twice; past that
/// bound the task is cancelled (the worker puts back what it held) and
/// waited for [`PAUSE_LIMIT`] more. If even that times out, the runtime's
/// shutdown drops the task.
#[derive(Debug, Default)]
pub struct TaskControl {
    state: Mutex<TaskState>,
    /// Signalled when the task ends.
    idle: Condvar,
    /// Set by `pause`: the task stops at its next check.
    pausing: AtomicBool,
}

#[derive(Debug, Default)]
struct TaskState {
    stop: Option<CancellationToken>,
    /// Cancelled by `pause`: the attempt in flight finishes, no retry
    /// follows (see `agent::Post::stop_retrying`).
    stop_retrying: Option<CancellationToken>,
    running: bool,
}

/// Added to the attempt timeout while `pause` waits for the task.
pub const PAUSE_MARGIN: Duration = Duration::from_millis(100);
/// How long `pause` waits for a cancelled task to stop.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(1);

/// Held by a running task: marks it ended however it ends (a panic
/// included), waking `pause`.
#[must_use]
pub struct Running<'a>(&'a TaskControl);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.state().running = false;
        self.0.idle.notify_all();
    }
}

impl TaskControl {
    fn state(&self) -> MutexGuard<'_, TaskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a task started and gives its stop and stop-retrying tokens;
    /// `None` if one runs already. The task holds [`TaskControl::running`]
    /// while it runs.
    pub fn begin(&self) -> Option<(CancellationToken, CancellationToken)> {
        let mut st = self.state();
        if st.running {
            return None;
        }
        let (stop, stop_retrying) = (CancellationToken::new(), CancellationToken::new());
        st.stop = Some(stop.clone());
        st.stop_retrying = Some(stop_retrying.clone());
        st.running = true;
        drop(st);
        self.pausing.store(false, Ordering::Release);
        Some((stop, stop_retrying))
    }

    /// The guard a started task holds (see [`Running`]).
    pub fn running(&self) -> Running<'_> {
        Running(self)
    }

    /// Whether `pause` asked the task to stop.
    pub fn is_pausing(&self) -> bool {
        self.pausing.load(Ordering::Acquire)
    }

    /// The current task's stop-retrying token (a fresh one if none runs).
    pub fn stop_retrying(&self) -> CancellationToken {
        self.state().stop_retrying.clone().unwrap_or_default()
    }

    /// The protocol of the type doc; `wake` makes the task look at
    /// `is_pausing` now, `attempt_timeout` bounds the attempt in flight.
    pub fn pause(&self, attempt_timeout: Duration, wake: impl FnOnce()) {
        self.pausing.store(true, Ordering::Release);
        if let Some(t) = self.state().stop_retrying.take() {
            t.cancel();
        }
        wake();
        if !self.wait_idle(attempt_timeout + PAUSE_MARGIN) {
            if let Some(t) = self.state().stop.take() {
                t.cancel();
            }
            self.wait_idle(PAUSE_LIMIT);
        }
        let mut st = self.state();
        st.running = false;
        st.stop = None;
    }

    /// After fork: the task may be started again.
    pub fn resume(&self) {
        self.pausing.store(false, Ordering::Release);
    }

    /// Cancels the task for good (its attempt in flight included).
    pub fn stop(&self) {
        let mut st = self.state();
        for t in [st.stop.take(), st.stop_retrying.take()]
            .into_iter()
            .flatten()
        {
            t.cancel();
        }
    }

    /// Waits until no task runs, at most `limit`: whether none does.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let st = self.state();
        let (st, _) = self
            .idle
            .wait_timeout_while(st, limit, |s| s.running)
            .unwrap_or_else(|p| p.into_inner());
        !st.running
    }
}

/// A future whose panic becomes `Err(payload)` instead of unwinding
/// through the runtime: a bug in one cycle of a worker must not end it.
/// The future is not polled again after a panic; the caller decides how it
/// is dropped.
pub struct CatchUnwind<F>(pub std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(p) => p.map(Ok),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime;
    use std::sync::atomic::AtomicUsize;

    /// Counts ticks in shared state; the task only borrows it.
    #[derive(Default)]
    struct Ticker {
        ticks: Arc<AtomicUsize>,
        starts: AtomicUsize,
        reset_in_child: AtomicBool,
        stop: Mutex<Option<CancellationToken>>,
    }

    impl Worker for Ticker {
        fn start(self: Arc<Self>, handle: &Handle) {
            let token = CancellationToken::new();
            *self.stop.lock().unwrap() = Some(token.clone());
            self.starts.fetch_add(1, Ordering::SeqCst);
            let ticks = self.ticks.clone();
            handle.spawn(async move {
                loop {
                    tokio::select! {
                        _ = token.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(1)) => {
                            ticks.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
        fn pause(&self) {
            if let Some(t) = self.stop.lock().unwrap().take() {
                t.cancel();
            }
        }
        fn resume(&self, in_child: bool) {
            if in_child {
                self.ticks.store(0, Ordering::SeqCst);
                self.reset_in_child.store(true, Ordering::SeqCst);
            }
        }
    }

    #[test]
    fn task_control_pauses_within_its_bounds() {
        let tick = Duration::from_millis(1);
        let c = TaskControl::default();
        let (stop, retrying) = c.begin().unwrap();
        assert!(c.begin().is_none(), "one task at a time");
        std::thread::scope(|s| {
            // Ends when its attempt may not be retried: not cancelled.
            s.spawn(|| {
                let _running = c.running();
                while !retrying.is_cancelled() {
                    std::thread::sleep(tick);
                }
            });
            let woken = AtomicBool::new(false);
            c.pause(Duration::from_secs(30), || {
                woken.store(true, Ordering::SeqCst)
            });
            assert!(woken.load(Ordering::SeqCst) && c.is_pausing());
            assert!(!stop.is_cancelled());
        });
        c.resume();
        assert!(!c.is_pausing());

        // Ignores the stop-retrying token: cancelled past attempt + margin.
        let (stop, _) = c.begin().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _running = c.running();
                while !stop.is_cancelled() {
                    std::thread::sleep(tick);
                }
            });
            let t0 = std::time::Instant::now();
            c.pause(Duration::from_millis(50), || {});
            let took = t0.elapsed();
            assert!(
                took >= Duration::from_millis(150) && took < PAUSE_LIMIT,
                "{took:?}"
            );
        });
        c.resume();

        // Never ends: pause still returns, after the limit.
        let (_, _) = c.begin().unwrap();
        let release = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _running = c.running();
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(tick);
                }
            });
            let t0 = std::time::Instant::now();
            c.pause(Duration::ZERO, || {});
            assert!(t0.elapsed() >= PAUSE_MARGIN + PAUSE_LIMIT);
            release.store(true, Ordering::SeqCst);
        });
        assert!(c.wait_idle(Duration::ZERO));
        // Stopped for good: both tokens cancelled.
        c.resume();
        let (stop, retrying) = c.begin().unwrap();
        c.stop();
        assert!(stop.is_cancelled() && retrying.is_cancelled());
    }

    fn wait_for(mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn workers_pause_at_fork_and_resume_after() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ticker = Arc::new(Ticker::default());
        register(&ticker).unwrap();
        wait_for(|| ticker.ticks.load(Ordering::SeqCst) > 3);

        runtime::before_fork();
        let paused_at = ticker.ticks.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ticker.ticks.load(Ordering::SeqCst), paused_at);
        assert!(runtime::tests::no_threads_left());

        runtime::after_fork_parent();
        wait_for(|| ticker.ticks.load(Ordering::SeqCst) > paused_at + 3);
        assert!(!ticker.reset_in_child.load(Ordering::SeqCst));

        runtime::before_fork();
        runtime::after_fork_child();
        assert!(ticker.reset_in_child.load(Ordering::SeqCst));
        wait_for(|| ticker.ticks.load(Ordering::SeqCst) > 3);
        assert_eq!(ticker.starts.load(Ordering::SeqCst), 3);

        drop(ticker);
        assert!(live().is_empty());
    }
}
