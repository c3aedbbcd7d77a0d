//! The flag-evaluation worker: a bounded queue filled by the calling
//! threads, drained into the [`Aggregate`] and flushed through the agent's
//! EVP proxy by a task on the shared runtime.
//!
//! - [`EvaluationWorker::record`] (calling thread) only pushes into the
//!   queue; a full queue drops the evaluation and counts it. The worker is
//!   woken early when the queue is a quarter full, so a busy process does
//!   not overflow it between flushes.
//! - Each cycle drains the queue into the aggregate (keying, privacy,
//!   pruning happen here). Every `flush_interval` the window ends: every
//!   row is sent and the caps start again. A `flush` request sends every
//!   row too, without ending the window.
//! - A body whose POST failed with a retryable error (connect error,
//!   timeout, 408, 429, 5xx) is not lost: its rows go back into the
//!   aggregate, within the caps, and are sent at the next flush. Only rows
//!   that cannot be kept, or that the agent refused for good, are failed.
//! - A panic in a cycle is caught: the worker goes on, the panic is
//!   counted and logged once; the evaluations it held are counted failed.
//! - Fork: `pause` stops the task (rows in flight go back into the
//!   aggregate); in a child everything inherited is forgotten (the parent
//!   sends it), in the parent the task starts again.
//!
//! Accounting: `recorded = sent + dropped + failed + pending`, where
//! `pending` is what is queued, aggregated or in flight, in evaluations.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::aggregate::{Aggregate, Counts, Landed, Row, RowKey, Tier};
use super::encode::{head, next_body};
use super::packed::{PackedQueue, PackedRef};
use super::FLAG_EVALUATIONS_PATH;
use crate::agent::{Post, SendReport};
use crate::exposures::Context;
use crate::http::{Client, Endpoint, UrlError};
use crate::log::ProblemLog;
use crate::retry::RetryPolicy;
use crate::worker::{CatchUnwind, TaskControl, Worker};

/// Bytes of queue kept reserved between drains (a queue of ordinary
/// evaluations, a few hundred bytes each, up to the default 4,096).
const KEEP_QUEUE_BYTES: usize = 1 << 20;

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct Config {
    pub url: String,
    pub context: Context,
    /// Per attempt.
    pub timeout: Duration,
    pub flush_interval: Duration,
    pub queue_size: usize,
    pub max_payload: usize,
}

/// A snapshot of the counters, in evaluations (`requests` in requests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub recorded: u64,
    /// Counted in rows the agent accepted.
    pub sent: u64,
    /// Queue full, degraded cap reached, too large even degraded, or
    /// recorded after `stop`.
    pub dropped: u64,
    /// Counted in degraded rows (also counted where they end up).
    pub degraded: u64,
    /// Refused by the agent for good, or not kept after a failure.
    pub failed: u64,
    /// Queued, aggregated or in flight.
    pub pending: u64,
    pub requests: u64,
    /// Panics caught in the worker.
    pub panics: u64,
    /// Evaluations the OpenFeature hook could not record.
    pub hook_failures: u64,
}

#[derive(Default)]
struct Counters {
    recorded: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
    degraded: AtomicU64,
    failed: AtomicU64,
    requests: AtomicU64,
    panics: AtomicU64,
    hook_failures: AtomicU64,
    /// Dropped by `record` (queue full, stopped); `dropped` is the
    /// worker's (caps, too large).
    dropped_on_record: AtomicU64,
    /// Evaluations taken from the queue: aggregated or in flight.
    held: AtomicU64,
}

#[derive(Default)]
/// Flush requests and their answers.
struct Flushes {
    /// Number of the last flush requested.
    requested: AtomicU64,
    /// (number of the last request a cycle answered, whether it sent
    /// everything).
    answered: watch::Sender<(u64, bool)>,
    /// `dropped + failed` when the previous flush reported.
    lost_reported: AtomicU64,
}

/// Aggregates evaluations and sends them.
pub struct EvaluationWorker {
    /// Where rows go, as a sidecar route.
    route: crate::sidecar::wire::EvpRoute,
    client: Client,
    head: Vec<u8>,
    timeout: Duration,
    deadline: Duration,
    retry: RetryPolicy,
    max_payload: usize,
    flush_interval: Duration,
    capacity: usize,
    wake_at: usize,
    queue: Mutex<PackedQueue>,
    aggregate: Mutex<Aggregate>,
    counters: Counters,
    flushes: Flushes,
    wake: Notify,
    stopped: AtomicBool,
    /// Set while a cycle that panicked is dropped: what it held is failed,
    /// not put back (it could panic again).
    discarding: AtomicBool,
    task: TaskControl,
    log: ProblemLog,
}

/// Milliseconds since the epoch. Read on the application's thread for
/// every new exposure and evaluation: the clock directly (`SystemTime`'s
/// `duration_since(UNIX_EPOCH)` cost more than the read itself).
pub fn now_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid place for the result; CLOCK_REALTIME always
    // exists, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    // `time_t` and `c_long` are i64 here, narrower on some targets.
    #[allow(clippy::unnecessary_cast)]
    let ms = ts.tv_sec as i64 * 1000 + ts.tv_nsec as i64 / 1_000_000;
    ms
}

impl EvaluationWorker {
    pub fn new(config: Config) -> Result<EvaluationWorker, UrlError> {
        let capacity = config.queue_size.max(1);
        Ok(EvaluationWorker {
            route: crate::sidecar::wire::EvpRoute::new(&config.url, &config.context),
            client: Client::new(Endpoint::parse(&config.url)?),
            head: head(&config.context),
            timeout: config.timeout,
            deadline: config.timeout * 3,
            retry: RetryPolicy::default(),
            max_payload: config.max_payload,
            flush_interval: config.flush_interval,
            capacity,
            wake_at: (capacity / 4).max(1),
            queue: Mutex::new(PackedQueue::new()),
            aggregate: Mutex::new(Aggregate::new()),
            counters: Counters::default(),
            flushes: Flushes {
                requested: AtomicU64::new(0),
                answered: watch::Sender::new((0, true)),
                lost_reported: AtomicU64::new(0),
            },
            wake: Notify::new(),
            stopped: AtomicBool::new(false),
            discarding: AtomicBool::new(false),
            task: TaskControl::default(),
            log: ProblemLog::new("flag evaluations"),
        })
    }

    fn queue(&self) -> MutexGuard<'_, PackedQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn aggregate(&self) -> MutexGuard<'_, Aggregate> {
        self.aggregate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an evaluation: false when it was dropped (queue full, or
    /// stopped), counted either way.
    pub fn record(&self, e: PackedRef<'_>) -> bool {
        let c = &self.counters;
        c.recorded.fetch_add(1, Ordering::Relaxed);
        let mut q = self.queue();
        if q.len() >= self.capacity || self.stopped.load(Ordering::Acquire) {
            drop(q);
            c.dropped_on_record.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        q.push(e);
        let wake = q.len() == self.wake_at;
        drop(q);
        if wake {
            self.wake.notify_one();
        }
        true
    }

    /// Adds rows aggregated elsewhere (by the workers of a sidecar
    /// listener) into this window's aggregate, summed with what is there;
    /// what the caps cannot hold is dropped and counted.
    pub fn merge_rows(&self, rows: Vec<Row>) {
        let c = &self.counters;
        let mut agg = self.aggregate();
        for row in rows {
            let n = row.counts.count;
            c.recorded.fetch_add(n, Ordering::Relaxed);
            c.held.fetch_add(n, Ordering::AcqRel);
            self.land(&mut agg, row.key, row.counts, row.tier, false);
        }
    }

    /// Counts an evaluation the OpenFeature hook could not record
    /// (`problem` is logged once while it lasts).
    pub fn hook_failed(&self, problem: &str) {
        self.counters.hook_failures.fetch_add(1, Ordering::Relaxed);
        self.log
            .outcome(Some(&format!("OpenFeature hook failed: {problem}")));
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let queued = self.queue().len() as u64;
        Stats {
            recorded: c.recorded.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed)
                + c.dropped_on_record.load(Ordering::Relaxed),
            degraded: c.degraded.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            pending: queued + c.held.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
            hook_failures: c.hook_failures.load(Ordering::Relaxed),
        }
    }

    /// The problem last met, while it lasts.
    pub fn last_error(&self) -> Option<String> {
        self.log.current()
    }

    /// Evaluations lost so far: dropped by `record` up to
    /// `on_record` (a snapshot), plus everything the worker dropped or failed.
    fn lost(&self, on_record: u64) -> u64 {
        let c = &self.counters;
        on_record + c.dropped.load(Ordering::Acquire) + c.failed.load(Ordering::Acquire)
    }

    /// Asks the worker to send every row now; the future resolves to true
    /// once everything recorded so far was accepted by the agent, false if
    /// a POST failed or anything since the previous flush was dropped or
    /// failed. Await it under a timeout, on the runtime.
    pub fn flush(self: &Arc<Self>) -> impl Future<Output = bool> + Send + 'static {
        // Drops by `record` after this call are for the next flush to report.
        let on_record = self.counters.dropped_on_record.load(Ordering::Acquire);
        let id = self.flushes.requested.fetch_add(1, Ordering::AcqRel) + 1;
        let mut answered = self.flushes.answered.subscribe();
        self.wake.notify_one();
        let this = self.clone();
        async move {
            let Ok(answer) = answered.wait_for(|(done, _)| *done >= id).await else {
                return false;
            };
            let sent_all = answer.1;
            let lost = this.lost(on_record);
            let before = this.flushes.lost_reported.swap(lost, Ordering::AcqRel);
            sent_all && lost == before
        }
    }

    /// Stops for good: later records are dropped. Call after a flush.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.task.stop();
    }

    /// Moves the queue into the aggregate.
    fn drain(&self) {
        let mut batch = {
            let mut q = self.queue();
            self.counters
                .held
                .fetch_add(q.len() as u64, Ordering::AcqRel);
            std::mem::take(&mut *q)
        };
        let total = batch.len() as u64;
        let mut done = 0u64;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut agg = self.aggregate();
            for packed in batch.iter() {
                match packed.unpack() {
                    Ok(e) => {
                        let (key, at) = RowKey::of(e);
                        self.land(&mut agg, key, Counts::one(at), Tier::Full, false);
                    }
                    Err(bad) => self.malformed(1, &bad.to_string()),
                }
                done += 1;
            }
        }));
        if let Err(panic) = result {
            self.caught(panic, total - done);
            return;
        }
        if done < total {
            self.malformed(total - done, "malformed evaluation queue");
        }
        // Keep the queue's capacity (up to a bound) for the next records.
        batch.clear(KEEP_QUEUE_BYTES);
        let mut q = self.queue();
        if q.is_empty() && q.capacity() < batch.capacity() {
            *q = batch;
        }
    }

    /// Evaluations that did not unpack: a bug (our packer wrote them),
    /// counted failed and logged once.
    fn malformed(&self, n: u64, problem: &str) {
        self.counters.held.fetch_sub(n, Ordering::AcqRel);
        self.counters.failed.fetch_add(n, Ordering::Relaxed);
        self.log.outcome(Some(problem));
    }

    /// Counts `counts` into `agg`; what cannot be kept is dropped (a new
    /// evaluation) or failed (a row put back after a failed send).
    fn land(&self, agg: &mut Aggregate, key: RowKey, counts: Counts, tier: Tier, retry: bool) {
        let c = &self.counters;
        match agg.add(key, counts, tier) {
            Landed::Full => {}
            Landed::Degraded => {
                if tier == Tier::Full {
                    c.degraded.fetch_add(counts.count, Ordering::Relaxed);
                }
            }
            Landed::Dropped => {
                c.held.fetch_sub(counts.count, Ordering::AcqRel);
                let lost = if retry { &c.failed } else { &c.dropped };
                lost.fetch_add(counts.count, Ordering::Relaxed);
                self.log.outcome(Some(if retry {
                    "rows kept after a failed send exceed the caps: counted failed"
                } else {
                    "degraded rows cap reached: evaluations dropped"
                }));
            }
        }
    }

    /// A panic caught in the worker: counted, logged once, and `held`
    /// evaluations it took with it counted failed.
    fn caught(&self, panic: Box<dyn std::any::Any + Send>, held: u64) {
        let c = &self.counters;
        c.panics.fetch_add(1, Ordering::Relaxed);
        c.held.fetch_sub(held, Ordering::AcqRel);
        c.failed.fetch_add(held, Ordering::Relaxed);
        let what = crate::log::panic_message(&*panic);
        self.log
            .outcome(Some(&format!("worker panicked (recovered): {what}")));
    }

    /// Sends every row; true when all were accepted.
    async fn send_all(&self, end_window: bool, generation: u64) -> bool {
        let rows = {
            let mut agg = self.aggregate();
            let rows = agg.take_rows();
            if end_window {
                agg.end_window();
            }
            rows
        };
        if rows.is_empty() {
            return true;
        }
        let mut flight = InFlight {
            worker: self,
            fates: vec![Fate::Pending; rows.len()],
            rows,
        };
        let mut report = SendReport::default();
        let sent_all = flight.send(generation, &mut report).await;
        self.counters
            .requests
            .fetch_add(report.requests as u64, Ordering::Relaxed);
        self.log.outcome(report.error.as_deref());
        sent_all
    }

    async fn cycle(&self, flush_id: u64, end_window: bool, generation: u64) -> bool {
        self.drain();
        let sent_all = self.send_all(end_window, generation).await;
        if flush_id > 0 {
            self.flushes
                .answered
                .send_modify(|a| *a = (a.0.max(flush_id), sent_all));
        }
        sent_all
    }

    async fn run(self: Arc<Self>, stop: CancellationToken, generation: u64) {
        let _running = self.task.running();
        let mut window_end = tokio::time::Instant::now() + self.flush_interval;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(window_end) => {}
            }
            if self.task.is_pausing() {
                break;
            }
            let requested = self.flushes.requested.load(Ordering::Acquire);
            let answered = self.flushes.answered.borrow().0;
            let due = tokio::time::Instant::now() >= window_end;
            let flush_id = if requested > answered { requested } else { 0 };
            if !due && flush_id == 0 {
                // Woken because the queue fills up: aggregate only.
                if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| self.drain())) {
                    self.caught(panic, 0);
                }
                continue;
            }
            if due {
                window_end = tokio::time::Instant::now() + self.flush_interval;
            }
            let mut work = CatchUnwind(Box::pin(self.cycle(flush_id, due, generation)));
            let outcome = tokio::select! {
                r = &mut work => r,
                _ = stop.cancelled() => break,
            };
            if let Err(panic) = outcome {
                // Whatever the cycle held is failed, not put back.
                self.discarding.store(true, Ordering::Release);
                drop(work);
                self.discarding.store(false, Ordering::Release);
                self.caught(panic, 0);
                if flush_id > 0 {
                    self.flushes
                        .answered
                        .send_modify(|a| *a = (a.0.max(flush_id), false));
                }
            }
            if self.flushes.requested.load(Ordering::Acquire) > self.flushes.answered.borrow().0 {
                // A flush was requested during the cycle: go again.
                self.wake.notify_one();
            }
        }
    }

    #[cfg(test)]
    fn with_retry(mut self, retry: RetryPolicy, deadline: Duration) -> Self {
        self.retry = retry;
        self.deadline = deadline;
        self
    }
}

/// What became of a row taken out to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Not settled yet: goes back into the aggregate if the send stops.
    Pending,
    /// Sent, dropped or failed: counted.
    Settled,
    /// Its POST failed but can succeed later: goes back into the aggregate.
    Keep,
}

/// Rows being sent. Whatever is not settled when this is dropped (the
/// send finished, was cancelled at fork, or the runtime shut down) goes
/// back into the aggregate, so nothing in flight is lost.
struct InFlight<'a> {
    worker: &'a EvaluationWorker,
    rows: Vec<Row>,
    fates: Vec<Fate>,
}

impl InFlight<'_> {
    fn settle(&mut self, i: usize, counter: &AtomicU64) {
        let n = self.rows[i].counts.count;
        counter.fetch_add(n, Ordering::Relaxed);
        self.worker.counters.held.fetch_sub(n, Ordering::AcqRel);
        self.fates[i] = Fate::Settled;
    }

    async fn send(&mut self, generation: u64, report: &mut SendReport) -> bool {
        let w = self.worker;
        let stop_retrying = w.task.stop_retrying();
        let c = &w.counters;
        let deadline = Instant::now() + w.deadline;
        let headers = [
            ("Content-Type", "application/json"),
            ("X-Datadog-EVP-Subdomain", "event-platform-intake"),
        ];
        let post = Post {
            client: &w.client,
            generation,
            path: FLAG_EVALUATIONS_PATH,
            headers: &headers,
            timeout: w.timeout,
            retry: &w.retry,
            stop_retrying: Some(&stop_retrying),
        };
        if let Some(client) = crate::sidecar::acquire() {
            self.hand_over(&client).await;
        }
        let timestamp = now_ms();
        let mut sent_all = true;
        let mut start = 0;
        let mut buf = Vec::new();
        while start < self.rows.len() {
            if self.fates[start] == Fate::Settled {
                // Held by the sidecar listener already.
                start += 1;
                continue;
            }
            let mut body = next_body(
                &w.head,
                &mut self.rows,
                start,
                timestamp,
                w.max_payload,
                buf,
            );
            buf = Vec::new();
            let range = start..body.end;
            start = body.end;
            for &i in &body.degraded {
                c.degraded
                    .fetch_add(self.rows[i].counts.count, Ordering::Relaxed);
            }
            for &i in &body.dropped {
                self.settle(i, &c.dropped);
                sent_all = false;
                report.note_error(format!(
                    "flag evaluation row dropped: alone it exceeds the {} byte payload limit",
                    w.max_payload
                ));
            }
            let Some(bytes) = body.bytes.take() else {
                continue;
            };
            let mut attempt = SendReport::default();
            let outcome = post.send(Bytes::from(bytes), deadline, &mut attempt).await;
            let accepted = outcome.is_ok();
            report.requests += attempt.requests;
            if let Some(e) = attempt.error {
                report.note_error(e);
            }
            if accepted {
                for i in range.filter(|i| body.holds(*i)) {
                    self.settle(i, &c.sent);
                }
                continue;
            }
            sent_all = false;
            let retryable = outcome.err().is_some_and(|u| u.retryable);
            for i in range.filter(|i| body.holds(*i)) {
                if retryable {
                    self.fates[i] = Fate::Keep;
                } else {
                    self.settle(i, &c.failed);
                }
            }
        }
        sent_all
    }
}

impl InFlight<'_> {
    /// Hands the rows over to the sidecar listener, a frame at a time;
    /// each acknowledged row is settled as sent. What is left is sent
    /// direct by the caller (counted in the sidecar's `evaluations_direct`).
    /// Runs as a task of the runtime (waits are the reactor's).
    async fn hand_over(&mut self, client: &crate::sidecar::client::Client) {
        use crate::sidecar::{wire, COUNTERS};
        let w = self.worker;
        let budget = w.max_payload.min(wire::MAX_FRAME / 2);
        let mut i = 0;
        while i < self.rows.len() {
            let start = i;
            let mut size = 0;
            while i < self.rows.len()
                && (i == start || size + wire::row_size(&self.rows[i]) <= budget)
            {
                size += wire::row_size(&self.rows[i]);
                i += 1;
            }
            let frame = wire::Evaluations {
                route: w.route.clone(),
                rows: self.rows[start..i].to_vec(),
            }
            .encode();
            if client
                .handover_async(wire::Kind::Evaluations, &frame)
                .await
                .is_err()
            {
                COUNTERS.fallback_batches.fetch_add(1, Ordering::Relaxed);
                let left: u64 = self.rows[start..].iter().map(|r| r.counts.count).sum();
                COUNTERS
                    .evaluations_direct
                    .fetch_add(left, Ordering::Relaxed);
                return;
            }
            for j in start..i {
                let n = self.rows[j].counts.count;
                COUNTERS
                    .evaluations_handed_over
                    .fetch_add(n, Ordering::Relaxed);
                self.settle(j, &w.counters.sent);
            }
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let w = self.worker;
        let discard = w.discarding.load(Ordering::Acquire);
        let mut agg = w.aggregate();
        for (row, fate) in std::mem::take(&mut self.rows).into_iter().zip(&self.fates) {
            if *fate == Fate::Settled {
                continue;
            }
            if discard {
                let n = row.counts.count;
                w.counters.held.fetch_sub(n, Ordering::AcqRel);
                w.counters.failed.fetch_add(n, Ordering::Relaxed);
            } else {
                w.land(&mut agg, row.key, row.counts, row.tier, true);
            }
        }
    }
}

impl Worker for EvaluationWorker {
    fn start(self: Arc<Self>, handle: &Handle) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let Some((token, _)) = self.task.begin() else {
            return;
        };
        let generation = crate::runtime::generation();
        handle.spawn(self.clone().run(token, generation));
        // A flush requested while paused is answered by the new task.
        self.wake.notify_one();
    }

    /// [`TaskControl::pause`]: a cycle cut off past the bound puts its
    /// rows back into the aggregate.
    fn pause(&self) {
        self.task
            .pause(self.client.attempt_timeout(self.timeout), || {
                self.wake.notify_one()
            });
    }

    fn resume(&self, in_child: bool) {
        self.task.resume();
        if !in_child {
            return;
        }
        // What was recorded before fork belongs to the parent, which sends it.
        *self.queue() = PackedQueue::new();
        *self.aggregate() = Aggregate::new();
        let c = &self.counters;
        for a in [
            &c.recorded,
            &c.sent,
            &c.dropped,
            &c.degraded,
            &c.failed,
            &c.requests,
            &c.panics,
            &c.hook_failures,
            &c.dropped_on_record,
            &c.held,
            &self.flushes.requested,
            &self.flushes.lost_reported,
        ] {
            a.store(0, Ordering::Release);
        }
        self.flushes.answered.send_replace((0, true));
        self.log.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::aggregate::Evaluation;
    use crate::flags::packed::Packed;
    use crate::runtime;
    use crate::test_http::server;
    use std::pin::Pin;
    use std::task::{Context as TaskContext, Poll};

    fn worker(url: &str) -> Arc<EvaluationWorker> {
        let w = EvaluationWorker::new(Config {
            url: url.into(),
            context: Context::default(),
            timeout: Duration::from_secs(2),
            flush_interval: Duration::from_secs(60),
            queue_size: 100,
            max_payload: 5 << 20,
        })
        .unwrap()
        .with_retry(
            RetryPolicy {
                max_retries: 1,
                base_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(1),
            },
            Duration::from_secs(2),
        );
        Arc::new(w)
    }

    fn eval(tk: &str) -> Packed {
        Packed::from(&Evaluation {
            flag: "f".into(),
            variant: Some("on".into()),
            targeting_key: Some(tk.into()),
            timestamp_ms: 1_760_000_000_000,
            ..Default::default()
        })
    }

    fn flush(h: &Handle, w: &Arc<EvaluationWorker>) -> bool {
        let f = w.flush();
        h.block_on(async { tokio::time::timeout(Duration::from_secs(10), f).await })
            .unwrap_or(false)
    }

    fn balanced(s: &Stats) -> bool {
        s.recorded == s.sent + s.dropped + s.failed + s.pending
    }

    #[test]
    fn retryable_failures_keep_rows_for_the_next_flush() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (h, _) = runtime::handle().unwrap();
        // Two attempts (one retry) fail with 503, then the agent is back.
        let (url, bodies) = h.block_on(server(vec![503, 503, 200]));
        let w = worker(&url);
        crate::worker::register(&w).unwrap();
        for i in 0..3 {
            assert!(w.record(eval(&i.to_string()).as_ref()));
            assert!(w.record(eval(&i.to_string()).as_ref()));
        }
        assert!(!flush(&h, &w));
        let s = w.stats();
        assert_eq!((s.sent, s.failed, s.pending), (0, 0, 6), "{s:?}");
        assert!(flush(&h, &w));
        let s = w.stats();
        assert_eq!(
            (s.sent, s.failed, s.pending, s.requests),
            (6, 0, 0, 3),
            "{s:?}"
        );
        assert!(balanced(&s));
        let last: serde_json::Value =
            serde_json::from_slice(bodies.lock().unwrap().last().unwrap()).unwrap();
        let counts: Vec<u64> = last["flagEvaluations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["evaluation_count"].as_u64().unwrap())
            .collect();
        assert_eq!(counts, [2, 2, 2]);
        w.stop();
    }

    #[test]
    fn refused_rows_fail_and_the_queue_overflow_is_counted() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (h, _) = runtime::handle().unwrap();
        let (url, _) = h.block_on(server(vec![400]));
        let w = worker(&url);
        // Not registered: nothing drains the queue.
        let accepted = (0..150)
            .filter(|i| w.record(eval(&i.to_string()).as_ref()))
            .count();
        assert_eq!(accepted, 100);
        let s = w.stats();
        assert_eq!((s.recorded, s.dropped, s.pending), (150, 50, 100));
        crate::worker::register(&w).unwrap();
        assert!(!flush(&h, &w));
        let s = w.stats();
        assert_eq!(
            (s.sent, s.failed, s.dropped, s.pending),
            (0, 100, 50, 0),
            "{s:?}"
        );
        assert!(balanced(&s));
        assert!(w.last_error().unwrap().contains("400"));
        w.stop();
    }

    #[test]
    fn a_panicking_cycle_is_caught_and_counted() {
        let mut work = CatchUnwind(Box::pin(async { panic!("boom") }));
        let waker = std::task::Waker::noop();
        let mut cx = TaskContext::from_waker(waker);
        let out: Poll<Result<(), _>> = Pin::new(&mut work).poll(&mut cx);
        match out {
            Poll::Ready(Err(p)) => assert_eq!(p.downcast_ref::<&str>(), Some(&"boom")),
            _ => panic!("expected a caught panic"),
        }
    }

    #[test]
    fn a_forked_child_starts_empty() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let w = worker("http://127.0.0.1:9");
        crate::worker::register(&w).unwrap();
        for i in 0..5 {
            w.record(eval(&i.to_string()).as_ref());
        }
        runtime::before_fork();
        runtime::after_fork_child();
        let s = w.stats();
        assert_eq!(s, Stats::default());
        w.stop();
    }
}
