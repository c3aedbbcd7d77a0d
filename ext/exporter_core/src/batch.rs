//! Asynchronous batching: a bounded native buffer drained by a background
//! worker on the shared runtime. The trace writer and feature-flag
//! exposures are both a [`BatchWorker`] with their own [`BatchSink`].
//!
//! `write` (on the caller's thread, which already converted the item under
//! the GVL) only pushes into the buffer. The flusher wakes every
//! `flush_interval`, or early when `wake_at` items wait or a flush is
//! requested, and sends everything queued in batches. It never touches Ruby.
//!
//! Drop policy: when the buffer holds `capacity` items, a new item is
//! dropped (not an old one: the oldest are closest to being sent) and
//! counted. Every item written ends in exactly one of `sent`, `failed`
//! (the agent did not accept it after retries), `dropped` (buffer full, or
//! alone over the payload cap) or is still `queued`.
//!
//! Fork: `pause` lets an in-flight batch finish for a short grace, then
//! cancels it and puts it back at the front of the queue, so nothing is
//! lost. In a child the queue is emptied: those items belong to the parent,
//! which sends them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::agent::{SendReport, TraceExporter};
use crate::log::ProblemLog;
use crate::span::Trace;
use crate::worker::Worker;

/// Where a batch worker sends its items.
pub trait BatchSink<T>: Send + Sync + 'static {
    /// Sends `batch` (items are borrowed, so a cancelled send loses none).
    /// Counts in the report are in items.
    fn send(
        &self,
        batch: &[T],
        generation: u64,
    ) -> impl std::future::Future<Output = SendReport> + Send;

    /// Forgets state inherited by a forked child.
    fn reset_in_child(&self) {}
}

impl BatchSink<Trace> for Arc<TraceExporter> {
    fn send(
        &self,
        batch: &[Trace],
        generation: u64,
    ) -> impl std::future::Future<Output = SendReport> + Send {
        TraceExporter::send(self, batch, generation)
    }
}

/// The asynchronous trace writer.
pub type TraceWriter = BatchWorker<Trace, Arc<TraceExporter>>;

/// Items sent per request batch at most.
pub const MAX_BATCH: usize = 1_000;
/// How long `pause` lets an in-flight batch finish before cancelling it.
const PAUSE_GRACE: Duration = Duration::from_millis(250);
/// How long `pause` waits for a cancelled flusher to stop.
const PAUSE_LIMIT: Duration = Duration::from_secs(1);

/// Counters of a batch worker. See the module doc for their invariant.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriterStats {
    pub written: u64,
    pub sent: u64,
    pub dropped: u64,
    pub failed: u64,
    pub queued: u64,
    pub requests: u64,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    requests: AtomicU64,
}

#[derive(Default)]
struct Control {
    stop: Option<CancellationToken>,
    running: bool,
}

/// A bounded buffer and its flusher.
pub struct BatchWorker<T, S> {
    sink: S,
    capacity: usize,
    wake_at: usize,
    flush_interval: Duration,
    queue: Mutex<VecDeque<(u64, T)>>,
    /// Sequence number of the last write (accepted or dropped).
    seq: AtomicU64,
    /// Highest sequence number accepted into the queue.
    accepted_max: AtomicU64,
    /// Highest sequence number whose fate is known (sent or failed).
    done: watch::Sender<u64>,
    /// Highest sequence number that failed or was dropped.
    lost_max: AtomicU64,
    /// Sequence number up to which a previous `flush` already reported.
    flushed_upto: AtomicU64,
    counters: Counters,
    wake: Notify,
    pausing: AtomicBool,
    stopped: AtomicBool,
    control: Mutex<Control>,
    idle: Condvar,
    log: ProblemLog,
}

impl<T: Send + 'static, S: BatchSink<T>> BatchWorker<T, S> {
    /// A worker holding up to `capacity` items, flushing every
    /// `flush_interval` or as soon as `wake_at` items wait. `what` names it
    /// in log lines.
    pub fn new(
        sink: S,
        capacity: usize,
        wake_at: usize,
        flush_interval: Duration,
        what: &'static str,
    ) -> Self {
        BatchWorker {
            sink,
            capacity: capacity.max(1),
            wake_at: wake_at.clamp(1, capacity.max(1)),
            flush_interval,
            queue: Mutex::new(VecDeque::new()),
            seq: AtomicU64::new(0),
            accepted_max: AtomicU64::new(0),
            done: watch::Sender::new(0),
            lost_max: AtomicU64::new(0),
            flushed_upto: AtomicU64::new(0),
            counters: Counters::default(),
            wake: Notify::new(),
            pausing: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            control: Mutex::new(Control::default()),
            idle: Condvar::new(),
            log: ProblemLog::new(what),
        }
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<(u64, T)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an item. False when it was dropped (buffer full or worker
    /// stopped).
    pub fn write(&self, item: T) -> bool {
        self.counters.written.fetch_add(1, Ordering::Relaxed);
        let mut q = self.queue();
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        if q.len() >= self.capacity || self.stopped.load(Ordering::Acquire) {
            drop(q);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            self.lost_max.fetch_max(seq, Ordering::AcqRel);
            return false;
        }
        q.push_back((seq, item));
        self.accepted_max.store(seq, Ordering::Release);
        let wake = q.len() >= self.wake_at;
        drop(q);
        if wake {
            self.wake.notify_one();
        }
        true
    }

    pub fn stats(&self) -> WriterStats {
        let c = &self.counters;
        WriterStats {
            written: c.written.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            queued: self.queue().len() as u64,
            requests: c.requests.load(Ordering::Relaxed),
        }
    }

    /// The problem last met by the flusher, while it lasts.
    pub fn last_error(&self) -> Option<String> {
        self.log.current()
    }

    /// Asks the flusher to send now; returns a future that resolves to true
    /// once every item written so far was accepted by the agent (false if
    /// any of them, since the previous flush, failed or was dropped). Await
    /// it under a timeout, on the runtime.
    pub fn flush(self: &Arc<Self>) -> impl std::future::Future<Output = bool> + Send + 'static {
        let target = self.accepted_max.load(Ordering::Acquire);
        let upto = self.seq.load(Ordering::Acquire);
        let floor = self.flushed_upto.swap(upto, Ordering::AcqRel);
        self.wake.notify_one();
        let mut done = self.done.subscribe();
        let this = self.clone();
        async move {
            let reached = done.wait_for(|d| *d >= target).await.is_ok();
            reached && this.lost_max.load(Ordering::Acquire) <= floor
        }
    }

    /// Stops for good: the flusher ends after its current batch, later
    /// writes are dropped. Call after a flush.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        if let Some(t) = self.control().stop.take() {
            t.cancel();
        }
    }

    fn take_batch(&self) -> (Vec<T>, u64) {
        let mut q = self.queue();
        let n = q.len().min(MAX_BATCH);
        let mut last = 0;
        let batch = q
            .drain(..n)
            .map(|(seq, t)| {
                last = seq;
                t
            })
            .collect();
        (batch, last)
    }

    fn requeue_front(&self, batch: Vec<T>, last_seq: u64) {
        let mut q = self.queue();
        let first = last_seq + 1 - batch.len() as u64;
        for (i, t) in batch.into_iter().enumerate().rev() {
            q.push_front((first + i as u64, t));
        }
    }

    fn account(&self, report: &SendReport, last_seq: u64) {
        let c = &self.counters;
        c.sent
            .fetch_add(report.trace_count as u64, Ordering::Relaxed);
        c.failed
            .fetch_add(report.failed_traces as u64, Ordering::Relaxed);
        c.dropped
            .fetch_add(report.oversized_traces as u64, Ordering::Relaxed);
        c.requests
            .fetch_add(report.requests as u64, Ordering::Relaxed);
        if report.failed_traces > 0 || report.oversized_traces > 0 {
            self.lost_max.fetch_max(last_seq, Ordering::AcqRel);
        }
        self.done.send_modify(|d| *d = (*d).max(last_seq));
        self.log.outcome(report.error.as_deref());
    }

    async fn run(self: Arc<Self>, stop: CancellationToken, generation: u64) {
        'outer: loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.flush_interval) => {}
            }
            while !self.pausing.load(Ordering::Acquire) {
                let (batch, last_seq) = self.take_batch();
                if batch.is_empty() {
                    break;
                }
                let report = tokio::select! {
                    r = self.sink.send(&batch, generation) => r,
                    _ = stop.cancelled() => {
                        self.requeue_front(batch, last_seq);
                        break 'outer;
                    }
                };
                self.account(&report, last_seq);
            }
            if self.pausing.load(Ordering::Acquire) {
                break;
            }
        }
        self.control().running = false;
        self.idle.notify_all();
    }

    fn wait_idle(&self, limit: Duration) -> bool {
        let ctl = self.control();
        let (ctl, _) = self
            .idle
            .wait_timeout_while(ctl, limit, |c| c.running)
            .unwrap_or_else(|p| p.into_inner());
        !ctl.running
    }
}

impl<T: Send + 'static, S: BatchSink<T>> Worker for BatchWorker<T, S> {
    fn start(self: Arc<Self>, handle: &Handle) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let token = CancellationToken::new();
        {
            let mut ctl = self.control();
            if ctl.running {
                return;
            }
            ctl.stop = Some(token.clone());
            ctl.running = true;
        }
        self.pausing.store(false, Ordering::Release);
        let generation = crate::runtime::generation();
        handle.spawn(self.run(token, generation));
    }

    fn pause(&self) {
        self.pausing.store(true, Ordering::Release);
        self.wake.notify_one();
        if !self.wait_idle(PAUSE_GRACE) {
            if let Some(t) = self.control().stop.take() {
                t.cancel();
            }
            // If even this times out, the runtime's shutdown drops the task.
            self.wait_idle(PAUSE_LIMIT);
        }
        let mut ctl = self.control();
        ctl.running = false;
        ctl.stop = None;
    }

    fn resume(&self, in_child: bool) {
        self.pausing.store(false, Ordering::Release);
        if !in_child {
            return;
        }
        // What was queued belongs to the parent, which sends it.
        self.queue().clear();
        for c in [
            &self.counters.written,
            &self.counters.sent,
            &self.counters.dropped,
            &self.counters.failed,
            &self.counters.requests,
            &self.seq,
            &self.accepted_max,
            &self.lost_max,
            &self.flushed_upto,
        ] {
            c.store(0, Ordering::Release);
        }
        self.done.send_replace(0);
        self.log.reset();
        self.sink.reset_in_child();
    }
}
