//! Asynchronous batching: a bounded native buffer drained by a background
//! worker on the shared runtime. The trace writer and feature-flag
//! exposures are both a [`BatchWorker`] with their own [`BatchSink`].
//!
//! `write` (on the caller's thread, which already converted the item under
//! the GVL) only pushes into the buffer. The flusher wakes every
//! `flush_interval`, or early when `wake_at` items wait or a flush is
//! requested, and sends everything queued in batches. It never touches Ruby.
//!
//! Accounting: every item written ends in exactly one of `sent`, `failed`
//! (refused for good: a 4xx other than 408/429), `dropped` (buffer full,
//! alone over the payload cap, or evicted to make room) or is still
//! `queued` (waiting or in flight).
//!
//! Outages lose nothing that fits: items whose send failed in a way that
//! can succeed later (agent down, timeout, 408/429/5xx) go back to the
//! front of the buffer, in order, and the flusher tries again after a
//! capped, jittered backoff, for as long as it takes. When new items need
//! the room meanwhile, the oldest are dropped (counted). A full buffer
//! drops the new item (the oldest are closest to being sent).
//!
//! Fork: `pause` stops retries and lets the attempt in flight finish (up to
//! its timeout), so a batch is neither cut off mid-request nor sent twice;
//! only an attempt that outlives that bound is cancelled and put back
//! (counted in `timed_out`: it may have arrived). In a child the queue is
//! emptied: those items belong to the parent, which sends them.
//!
//! A panic in the sink is caught: the batch is counted failed with the
//! panic's message, logged once, and the flusher carries on. A worker whose
//! owner is gone ([`BatchWorker::abandon`]) makes one bounded last send of
//! what it holds, then ends, releasing its sink (and its connections).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::agent::{SendReport, TraceExporter};
use crate::log::ProblemLog;
use crate::retry::jitter;
use crate::span::Trace;
use crate::worker::{CatchUnwind, TaskControl, Worker};

/// Where a batch worker sends its items.
pub trait BatchSink<T>: Send + Sync + 'static {
    /// Sends `batch` (items are borrowed, so a cancelled send loses none).
    /// Counts in the report are in items; `retry_from` marks the items to
    /// keep and send again. Once `stop_retrying` is cancelled the send ends
    /// after the attempt in flight (see `agent::Post::stop_retrying`).
    fn send(
        &self,
        batch: &[T],
        generation: u64,
        stop_retrying: &CancellationToken,
    ) -> impl std::future::Future<Output = SendReport> + Send;

    /// How long one attempt may take at most now (bounds `pause`).
    fn attempt_timeout(&self) -> Duration;

    /// Items dropped after they were accepted (evicted from a full buffer
    /// by items put back), before the sink saw them settle.
    fn discarded(&self, _items: &[T]) {}

    /// Forgets state inherited by a forked child.
    fn reset_in_child(&self) {}

    /// Takes the items done with (sent, failed or dropped): dropped here,
    /// unless the sink has a use for their storage.
    fn recycle(&self, items: Vec<T>) {
        drop(items);
    }
}

impl BatchSink<Trace> for Arc<TraceExporter> {
    fn send(
        &self,
        batch: &[Trace],
        generation: u64,
        stop_retrying: &CancellationToken,
    ) -> impl std::future::Future<Output = SendReport> + Send {
        TraceExporter::send(self, batch, generation, Some(stop_retrying))
    }

    fn attempt_timeout(&self) -> Duration {
        TraceExporter::attempt_timeout(self)
    }

    fn recycle(&self, traces: Vec<Trace>) {
        crate::span::TRACE_POOL.give(traces);
    }
}

/// The asynchronous trace writer: through the sidecar when the process
/// is a sidecar client, else direct.
pub type TraceWriter = BatchWorker<Trace, crate::sidecar::sink::Sidecar<Arc<TraceExporter>>>;

/// Items sent per request batch at most.
pub const MAX_BATCH: usize = 1_000;
/// First wait before sending kept items again, and the cap of the
/// exponential backoff (each wait is jittered between half and all of it).
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long an abandoned worker's last send may take.
const LAST_SEND_LIMIT: Duration = Duration::from_secs(5);

/// Counters of a batch worker. See the module doc for their invariant.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriterStats {
    pub written: u64,
    pub sent: u64,
    pub dropped: u64,
    pub failed: u64,
    /// Waiting in the buffer or in flight.
    pub queued: u64,
    pub requests: u64,
    /// Items in requests that timed out after being sent and were sent
    /// again (or, at fork, put back): the agent may have them twice. Not
    /// part of the sum above (each such item is also sent, failed, dropped
    /// or queued).
    pub timed_out: u64,
    /// Times items were put back after a retryable failure.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    requests: AtomicU64,
    timed_out: AtomicU64,
    retries: AtomicU64,
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
    /// Items taken from the queue by the flusher and not yet accounted.
    in_flight: AtomicU64,
    wake: Notify,
    stopped: AtomicBool,
    /// The owner is gone: send what is held once, then end.
    abandoned: AtomicBool,
    task: TaskControl,
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
            in_flight: AtomicU64::new(0),
            wake: Notify::new(),
            stopped: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            task: TaskControl::default(),
            log: ProblemLog::new(what),
        }
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Whether `n` more items fit now, counting those in flight (they are
    /// still held: a failed send puts them back).
    pub fn has_room(&self, n: usize) -> bool {
        let held = self.queue().len() + self.in_flight.load(Ordering::Acquire) as usize;
        held + n <= self.capacity && !self.stopped.load(Ordering::Acquire)
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<(u64, T)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
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
            self.sink.recycle(vec![item]);
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
            queued: self.queue().len() as u64 + self.in_flight.load(Ordering::Acquire),
            requests: c.requests.load(Ordering::Relaxed),
            timed_out: c.timed_out.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
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
        let ticket = self.flush_ticket();
        self.flushed(ticket)
    }

    /// What a flush started now waits for; see [`BatchWorker::flushed`].
    pub fn flush_ticket(&self) -> FlushTicket {
        let target = self.accepted_max.load(Ordering::Acquire);
        let upto = self.seq.load(Ordering::Acquire);
        let floor = self.flushed_upto.swap(upto, Ordering::AcqRel);
        self.wake.notify_one();
        FlushTicket { target, floor }
    }

    /// Resolves to the outcome of the flush `ticket` stands for. A flush
    /// whose wait was abandoned by a fork waits again with the same ticket
    /// on the next runtime, so it reports the truth.
    pub fn flushed(
        self: &Arc<Self>,
        ticket: FlushTicket,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let mut done = self.done.subscribe();
        let this = self.clone();
        async move {
            let reached = done.wait_for(|d| *d >= ticket.target).await.is_ok();
            reached && this.lost_max.load(Ordering::Acquire) <= ticket.floor
        }
    }

    /// Stops for good: the flusher ends after its current batch, later
    /// writes are dropped. Call after a flush.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.task.stop();
    }

    /// The owner is gone (its Ruby object was collected without `stop`):
    /// the flusher makes one last send of what it holds (bounded by
    /// `LAST_SEND_LIMIT`, no retries), then ends and releases the sink.
    /// Later writes are dropped.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Takes the next batch out of the queue, with each item's sequence
    /// number (the numbers are increasing, not always consecutive: dropped
    /// writes took numbers too).
    fn take_batch(&self) -> (Vec<T>, Vec<u64>) {
        let mut q = self.queue();
        let n = q.len().min(MAX_BATCH);
        self.in_flight.store(n as u64, Ordering::Release);
        q.drain(..n).map(|(seq, t)| (t, seq)).unzip()
    }

    /// Puts `batch` back at the front of the queue, in order. If the queue
    /// then holds more than its capacity, the oldest items are dropped.
    fn requeue_front(&self, batch: Vec<T>, seqs: &[u64]) {
        let mut q = self.queue();
        for (t, seq) in batch.into_iter().zip(seqs).rev() {
            q.push_front((*seq, t));
        }
        let mut gone = Vec::new();
        let mut last = 0;
        while q.len() > self.capacity {
            if let Some((seq, t)) = q.pop_front() {
                gone.push(t);
                last = seq;
            }
        }
        self.in_flight.store(0, Ordering::Release);
        drop(q);
        let evicted = gone.len() as u64;
        if evicted > 0 {
            self.sink.discarded(&gone);
            self.counters.dropped.fetch_add(evicted, Ordering::Relaxed);
            self.lost_max.fetch_max(last, Ordering::AcqRel);
            self.done.send_modify(|d| *d = (*d).max(last));
        }
    }

    /// Counts what a send did and puts back what is to be sent again.
    /// Returns whether anything was put back.
    fn account(&self, report: &SendReport, mut batch: Vec<T>, seqs: &[u64]) -> bool {
        let c = &self.counters;
        let kept = report
            .retry_from
            .map_or(0, |i| batch.len() - i.min(batch.len()));
        c.sent
            .fetch_add(report.trace_count as u64, Ordering::Relaxed);
        let failed = (report.failed_traces - kept.min(report.failed_traces)) as u64;
        c.failed.fetch_add(failed, Ordering::Relaxed);
        c.dropped
            .fetch_add(report.oversized_traces as u64, Ordering::Relaxed);
        c.requests
            .fetch_add(report.requests as u64, Ordering::Relaxed);
        c.timed_out
            .fetch_add(report.timed_out_traces as u64, Ordering::Relaxed);
        let settled = seqs.len() - kept;
        let settled_max = settled.checked_sub(1).map(|i| seqs[i]);
        if let Some(last) = settled_max {
            if failed > 0 || report.oversized_traces > 0 {
                self.lost_max.fetch_max(last, Ordering::AcqRel);
            }
        }
        if kept > 0 {
            c.retries.fetch_add(1, Ordering::Relaxed);
            let again = batch.split_off(settled);
            self.requeue_front(again, &seqs[settled..]);
        } else {
            self.in_flight.store(0, Ordering::Release);
        }
        // Logged before `done` moves, so a flush that returns sees it.
        self.log.outcome(report.error.as_deref());
        if let Some(last) = settled_max {
            self.done.send_modify(|d| *d = (*d).max(last));
        }
        self.sink.recycle(batch);
        kept > 0
    }

    /// Sends one batch, with any panic in the sink turned into a failed
    /// report (the flusher must outlive a bug).
    fn send_batch<'a>(
        &'a self,
        batch: &'a [T],
        generation: u64,
        stop_retrying: &'a CancellationToken,
    ) -> impl std::future::Future<Output = SendReport> + Send + 'a {
        let count = batch.len();
        let send = CatchUnwind(Box::pin(self.sink.send(batch, generation, stop_retrying)));
        async move {
            send.await.unwrap_or_else(|panic| {
                let msg = crate::log::panic_message(&*panic);
                SendReport::failed(count, format!("internal error (panic): {msg}"))
            })
        }
    }

    async fn run(
        self: Arc<Self>,
        stop: CancellationToken,
        stop_retrying: CancellationToken,
        generation: u64,
    ) {
        let _running = self.task.running();
        // Consecutive sends that had to keep items back.
        let mut failures: u32 = 0;
        'outer: loop {
            let wait = match failures {
                0 => self.flush_interval,
                n => backoff(n),
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                // While backing off, writes and flush requests do not cut
                // the wait short: the agent is not ready.
                _ = self.wake.notified(), if failures == 0 => {}
                _ = tokio::time::sleep(wait) => {}
            }
            if self.abandoned.load(Ordering::Acquire) {
                self.last_send(generation).await;
                break;
            }
            while !self.task.is_pausing() {
                let (batch, seqs) = self.take_batch();
                if batch.is_empty() {
                    break;
                }
                let report = tokio::select! {
                    r = self.send_batch(&batch, generation, &stop_retrying) => r,
                    _ = stop.cancelled() => {
                        // Cut off mid-request (fork past the pause bound,
                        // or stop): kept, and it may have arrived.
                        self.counters.timed_out.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        self.requeue_front(batch, &seqs);
                        break 'outer;
                    }
                };
                if self.account(&report, batch, &seqs) {
                    failures = failures.saturating_add(1);
                    continue 'outer;
                }
                failures = 0;
            }
            if self.task.is_pausing() {
                break;
            }
        }
    }

    /// One bounded pass over what an abandoned worker holds.
    async fn last_send(&self, generation: u64) {
        let never = CancellationToken::new();
        let _ = tokio::time::timeout(LAST_SEND_LIMIT, async {
            loop {
                let (batch, seqs) = self.take_batch();
                if batch.is_empty() {
                    break;
                }
                let report = self.send_batch(&batch, generation, &never).await;
                if self.account(&report, batch, &seqs) {
                    break;
                }
            }
        })
        .await;
    }
}

impl<T: Send + 'static, S: BatchSink<T>> Worker for BatchWorker<T, S> {
    fn start(self: Arc<Self>, handle: &Handle) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let Some((token, stop_retrying)) = self.task.begin() else {
            return;
        };
        let generation = crate::runtime::generation();
        handle.spawn(self.run(token, stop_retrying, generation));
    }

    /// [`TaskControl::pause`]: a batch cut off past the bound is put
    /// back (counted as possibly arrived).
    fn pause(&self) {
        self.task
            .pause(self.sink.attempt_timeout(), || self.wake.notify_one());
    }

    fn resume(&self, in_child: bool) {
        self.task.resume();
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
            &self.counters.timed_out,
            &self.counters.retries,
            &self.in_flight,
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

/// What a flush waits for: every item up to `target` settled, and nothing
/// lost after `floor` (the previous flush's reach).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushTicket {
    target: u64,
    floor: u64,
}

/// The wait before sending kept items again, after `failures` sends in a
/// row had to keep some: exponential from `BACKOFF_BASE`, capped at
/// `BACKOFF_MAX`, jittered between half and all of it.
fn backoff(failures: u32) -> Duration {
    let step = BACKOFF_BASE
        .saturating_mul(
            1u32.checked_shl(failures.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .min(BACKOFF_MAX);
    step.mul_f64(0.5 + 0.5 * jitter())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime;
    use std::sync::atomic::AtomicUsize;

    /// A sink that answers from a script: per call, `Ok` (accept all),
    /// `Retry` (retryable failure of everything) or `Panic`.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Ok,
        Retry,
        Panic,
    }

    struct Scripted {
        steps: Mutex<VecDeque<Step>>,
        calls: AtomicUsize,
        delivered: Arc<Mutex<Vec<u32>>>,
        discarded: Mutex<Vec<u32>>,
    }

    impl Scripted {
        fn new(steps: &[Step]) -> Scripted {
            Scripted {
                steps: Mutex::new(steps.iter().copied().collect()),
                calls: AtomicUsize::new(0),
                delivered: Arc::default(),
                discarded: Mutex::default(),
            }
        }
    }

    impl BatchSink<u32> for Scripted {
        async fn send(&self, batch: &[u32], _: u64, _: &CancellationToken) -> SendReport {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let step = self.steps.lock().unwrap().pop_front().unwrap_or(Step::Ok);
            match step {
                Step::Ok => {
                    self.delivered.lock().unwrap().extend_from_slice(batch);
                    SendReport {
                        trace_count: batch.len(),
                        requests: 1,
                        ..Default::default()
                    }
                }
                Step::Retry => SendReport {
                    failed_traces: batch.len(),
                    retry_from: Some(0),
                    requests: 1,
                    error: Some("agent down".into()),
                    ..Default::default()
                },
                Step::Panic => panic!("sink bug"),
            }
        }

        fn attempt_timeout(&self) -> Duration {
            Duration::from_millis(100)
        }

        fn discarded(&self, items: &[u32]) {
            self.discarded.lock().unwrap().extend_from_slice(items);
        }
    }

    fn worker(steps: &[Step], capacity: usize) -> Arc<BatchWorker<u32, Scripted>> {
        Arc::new(BatchWorker::new(
            Scripted::new(steps),
            capacity,
            capacity,
            Duration::from_secs(3600),
            "test worker",
        ))
    }

    fn flush(w: &Arc<BatchWorker<u32, Scripted>>) -> bool {
        let (h, _) = runtime::handle().unwrap();
        let f = w.flush();
        h.block_on(async { tokio::time::timeout(Duration::from_secs(10), f).await })
            .unwrap_or(false)
    }

    fn adds_up(s: &WriterStats) -> bool {
        s.written == s.sent + s.failed + s.dropped + s.queued
    }

    #[test]
    fn retryable_failures_are_kept_in_order_and_sent_once() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let w = worker(&[Step::Retry, Step::Retry, Step::Ok], 100);
        crate::worker::register(&w).unwrap();
        for i in 0..10 {
            assert!(w.write(i));
        }
        assert!(flush(&w));
        assert_eq!(
            *w.sink().delivered.lock().unwrap(),
            (0..10).collect::<Vec<_>>()
        );
        let s = w.stats();
        assert_eq!((s.sent, s.failed, s.dropped, s.queued), (10, 0, 0, 0));
        assert_eq!(s.retries, 2);
        assert!(adds_up(&s));
        w.stop();
    }

    #[test]
    fn kept_items_give_way_to_new_ones_oldest_first() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let w = worker(&[Step::Retry], 5);
        let items: Vec<u32> = (0..5).collect();
        // Taken as a batch, then written over while "in flight".
        for i in &items {
            w.write(*i);
        }
        let (batch, seqs) = w.take_batch();
        for i in 5..8 {
            assert!(w.write(i));
        }
        assert_eq!(w.stats().queued, 8);
        let report = SendReport {
            failed_traces: 5,
            retry_from: Some(0),
            ..Default::default()
        };
        assert!(w.account(&report, batch, &seqs));
        let s = w.stats();
        // Capacity 5: the three oldest kept items were dropped.
        assert_eq!((s.dropped, s.queued, s.failed), (3, 5, 0));
        assert!(adds_up(&s));
        let left: Vec<u32> = w.queue().iter().map(|(_, t)| *t).collect();
        assert_eq!(left, vec![3, 4, 5, 6, 7]);
        // The sink is told which accepted items were dropped (exposures
        // un-mark their dedup entries).
        assert_eq!(*w.sink().discarded.lock().unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn a_panicking_sink_fails_the_batch_and_the_worker_carries_on() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let w = worker(&[Step::Panic, Step::Ok], 100);
        crate::worker::register(&w).unwrap();
        w.write(1);
        assert!(!flush(&w));
        assert!(w.last_error().unwrap().contains("sink bug"));
        w.write(2);
        assert!(flush(&w));
        let s = w.stats();
        assert_eq!((s.written, s.sent, s.failed), (2, 1, 1));
        assert!(adds_up(&s));
        assert_eq!(*w.sink().delivered.lock().unwrap(), vec![2]);
        w.stop();
    }

    #[test]
    fn an_abandoned_worker_sends_what_it_holds_then_ends() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let w = worker(&[], 100);
        crate::worker::register(&w).unwrap();
        w.write(7);
        let weak = Arc::downgrade(&w);
        let delivered = w.sink().delivered.clone();
        w.abandon();
        assert!(!w.write(8), "writes after abandon are dropped");
        drop(w);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while weak.strong_count() > 0 {
            assert!(std::time::Instant::now() < deadline, "worker not released");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(*delivered.lock().unwrap(), vec![7]);
    }
}
