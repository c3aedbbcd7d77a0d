//! Native background workers that take part in the fork lifecycle.
//!
//! A worker is a long-lived task on the shared runtime (the trace writer's
//! flusher, later feature-flag telemetry). Its state lives in the worker
//! object, not in the task, so the runtime can be shut down at fork without
//! losing anything:
//!
//! - `pause` (before fork): stop the task and wait, bounded, until it is idle;
//! - `resume(in_child = false)` (parent after fork): nothing to reset;
//! - `resume(in_child = true)`: reset state inherited from the parent (its
//!   queue belongs to the parent, which sends it);
//! - `start(handle)`: spawn the task on a new runtime; called whenever a
//!   runtime starts, and at registration if one is running.

use std::sync::{Arc, Mutex, Weak};

use tokio::runtime::Handle;

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
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

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
