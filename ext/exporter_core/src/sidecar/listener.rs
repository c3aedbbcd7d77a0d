//! The listener: in the forking parent, it takes what its children hand
//! over and sends it to the agent, once for the whole server.
//!
//! It owns the server side of every connection and one sender per
//! destination ("route"): trace bodies with the same agent and headers go
//! to one [`BodyWorker`] (batched into requests under the payload cap);
//! exposures to one exposures worker (one dedup LRU for every worker
//! process); evaluation rows into one evaluation aggregate (summed across
//! workers per flush window).
//!
//! It is a [`Worker`] of the shared runtime: at fork its connection tasks
//! stop with the runtime (no thread of ours at the moment of fork); the
//! connections themselves (their fds, and any bytes read or to be written)
//! live in this object, and are served again when the runtime restarts.
//! A frame is processed between two awaits, so a task stopped at fork
//! never leaves one half-handled.
//!
//! A payload is acknowledged once it is queued here; when a buffer is full
//! (bodies past [`Limits::held_bytes`], a queue at its capacity) or its
//! route cannot be served, the answer is a Nack and the worker sends it
//! direct. A peer that breaks the protocol loses its connection, nobody
//! else's. Nothing here exits or aborts the host.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::wire::{self, EvpRoute, Hello, Kind, TraceRoute, Welcome, WireError};
use crate::agent::{Config as AgentConfig, SendReport, TraceExporter};
use crate::batch::{BatchSink, BatchWorker};
use crate::exposures::{self, EvpSink, ExposureWorker};
use crate::flags::worker::{Config as EvaluationConfig, EvaluationWorker};
use crate::log::ProblemLog;
use crate::worker::Worker;

/// Test-only switch: while set, listeners read nothing (their clients
/// time out and send direct).
pub static STALL: AtomicBool = AtomicBool::new(false);

/// How often the listener's senders flush at least.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// The flush window of the evaluation aggregate (as a worker's own).
pub const EVALUATION_WINDOW: Duration = Duration::from_secs(10);
/// Destinations served per kind; a payload for one more is refused.
const MAX_ROUTES: usize = 8;

/// What the listener holds at most.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of trace bodies queued, all routes together.
    pub held_bytes: u64,
    /// Bodies queued per route.
    pub bodies: usize,
    /// Exposures queued per route.
    pub exposures: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            held_bytes: 64 * 1024 * 1024,
            bodies: 4_096,
            exposures: 100_000,
        }
    }
}

/// Counters of a listener.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    pub connections: AtomicU64,
    pub closed: AtomicU64,
    pub peers_refused: AtomicU64,
    pub handshakes_refused: AtomicU64,
    pub bad_frames: AtomicU64,
    pub acked: AtomicU64,
    pub nacked: AtomicU64,
    pub traces_received: AtomicU64,
    pub traces_sent: AtomicU64,
    pub traces_failed: AtomicU64,
    pub exposures_received: AtomicU64,
    pub evaluations_received: AtomicU64,
}

/// Releases its share of the held-bytes budget when dropped, wherever the
/// body ends (sent, failed, evicted, forgotten in a child).
struct Held {
    bytes: u64,
    total: Arc<AtomicU64>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// One v0.4 body as the worker encoded it: a slice of the bytes read from
/// its connection (never copied on the way in).
pub struct Body {
    body: Bytes,
    /// Length of its array header: the traces are `body[header..]`.
    header: usize,
    count: u32,
    _held: Held,
}

impl Body {
    /// The traces, without the array header.
    fn traces(&self) -> &[u8] {
        &self.body[self.header..]
    }
}

/// Sends bodies to one agent, several per request: their traces under one
/// array header, as long as the request stays under the payload cap.
pub struct BodySink {
    exporter: TraceExporter,
    counters: Arc<ListenerCounters>,
    /// The buffer of the last request that joined several bodies, reused.
    spare: Mutex<Vec<u8>>,
}

impl BodySink {
    /// The request body for `bodies`: the one body as it came (no copy),
    /// or their traces under one array header in a reused buffer.
    fn request_body(&self, bodies: &[Body], count: u64, size: usize) -> Bytes {
        if let [one] = bodies {
            return one.body.clone();
        }
        let mut body = self
            .spare
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        body.clear();
        body.reserve(size);
        body.push(0xdd);
        body.extend_from_slice(&(count.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        for b in bodies {
            body.extend_from_slice(b.traces());
        }
        Bytes::from(body)
    }

    /// Keeps a joined request's buffer once the request no longer holds it.
    fn keep_spare(&self, body: Bytes) {
        let Ok(buf) = body.try_into_mut() else {
            return;
        };
        let buf = Vec::from(buf);
        if buf.capacity() > self.exporter.config().max_payload.saturating_mul(2) {
            return;
        }
        if let Ok(mut spare) = self.spare.lock() {
            if buf.capacity() > spare.capacity() {
                *spare = buf;
            }
        }
    }
}

impl BatchSink<Body> for BodySink {
    async fn send(
        &self,
        batch: &[Body],
        generation: u64,
        stop: &tokio_util::sync::CancellationToken,
    ) -> SendReport {
        let cap = self.exporter.config().max_payload;
        let mut report = SendReport::default();
        let mut i = 0;
        while i < batch.len() {
            let start = i;
            let mut size = 5;
            let mut count: u64 = 0;
            while i < batch.len() && (i == start || size + batch[i].traces().len() <= cap) {
                size += batch[i].traces().len();
                count += u64::from(batch[i].count);
                i += 1;
            }
            let body = self.request_body(&batch[start..i], count, size);
            let joined = i - start > 1;
            let outcome = self
                .exporter
                .send_encoded(
                    body.clone(),
                    count as usize,
                    generation,
                    Some(stop),
                    &mut report,
                )
                .await;
            if joined {
                self.keep_spare(body);
            }
            match outcome {
                Ok(()) => {
                    report.trace_count += i - start;
                    self.counters
                        .traces_sent
                        .fetch_add(count, Ordering::Relaxed);
                }
                Err(u) if u.retryable => {
                    report.retry_from = Some(start);
                    report.failed_traces += batch.len() - start;
                    if u.maybe_arrived {
                        report.timed_out_traces += i - start;
                    }
                    break;
                }
                Err(u) => {
                    report.failed_traces += i - start;
                    self.counters
                        .traces_failed
                        .fetch_add(count, Ordering::Relaxed);
                    if u.maybe_arrived {
                        report.timed_out_traces += i - start;
                    }
                }
            }
        }
        report
    }

    fn attempt_timeout(&self) -> Duration {
        self.exporter.attempt_timeout()
    }
}

/// Whether a route stays when a new one is needed: one that holds
/// nothing is stopped and let go (it is made again on its next payload).
fn keep_route(held: u64, stop: impl FnOnce()) -> bool {
    if held > 0 {
        return true;
    }
    stop();
    false
}

/// The trace sender of one route.
pub type BodyWorker = BatchWorker<Body, BodySink>;

#[derive(Default)]
struct Routes {
    traces: Vec<(TraceRoute, Arc<BodyWorker>)>,
    exposures: Vec<(EvpRoute, Arc<ExposureWorker>)>,
    evaluations: Vec<(EvpRoute, Arc<EvaluationWorker>)>,
}

#[derive(Default)]
struct ConnState {
    stream: Option<UnixStream>,
    /// Bytes read; whole frames are split off it and their trace bodies
    /// kept as slices of it.
    inbuf: BytesMut,
    outbuf: Vec<u8>,
    greeted: bool,
    /// Close once `outbuf` is written (after a refusal).
    closing: bool,
    /// A task serves it now.
    serving: bool,
}

struct Conn {
    state: Mutex<ConnState>,
}

impl Conn {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The listener of a forking parent.
pub struct Listener {
    conns: Mutex<Vec<Arc<Conn>>>,
    stop: Mutex<Option<CancellationToken>>,
    routes: Mutex<Routes>,
    held_bytes: Arc<AtomicU64>,
    limits: Limits,
    counters: Arc<ListenerCounters>,
    gem_version: String,
    /// In a child: serves nothing, ever.
    retired: AtomicBool,
    log: ProblemLog,
}

/// What to answer a frame with.
enum Answer {
    Ack,
    /// An `Ack` carrying a reply (to a [`Kind::Status`] request).
    Reply(Vec<u8>),
    Nack(String),
    /// The peer broke the protocol: close its connection.
    Close(WireError),
}

impl Listener {
    pub fn new(gem_version: &str, limits: Limits) -> Listener {
        Listener {
            conns: Mutex::new(Vec::new()),
            stop: Mutex::new(None),
            routes: Mutex::new(Routes::default()),
            held_bytes: Arc::new(AtomicU64::new(0)),
            limits,
            counters: Arc::new(ListenerCounters::default()),
            gem_version: gem_version.to_owned(),
            retired: AtomicBool::new(false),
            log: ProblemLog::new("sidecar listener"),
        }
    }

    pub fn counters(&self) -> &ListenerCounters {
        &self.counters
    }

    /// Every counter of this listener, and what it holds now, by name
    /// (as `Exporter::Sidecar.status` and the helper's status show them).
    pub fn counter_list(&self) -> Vec<(&'static str, u64)> {
        let n = &self.counters;
        let (bodies, exposures, evaluations) = self.pending();
        vec![
            ("connections", n.connections.load(Ordering::Relaxed)),
            ("connections_open", self.open_connections() as u64),
            ("peers_refused", n.peers_refused.load(Ordering::Relaxed)),
            (
                "handshakes_refused",
                n.handshakes_refused.load(Ordering::Relaxed),
            ),
            ("bad_frames", n.bad_frames.load(Ordering::Relaxed)),
            ("frames_acked", n.acked.load(Ordering::Relaxed)),
            ("frames_nacked", n.nacked.load(Ordering::Relaxed)),
            ("traces_received", n.traces_received.load(Ordering::Relaxed)),
            ("traces_sent", n.traces_sent.load(Ordering::Relaxed)),
            ("traces_failed", n.traces_failed.load(Ordering::Relaxed)),
            (
                "exposures_received",
                n.exposures_received.load(Ordering::Relaxed),
            ),
            ("exposures_deduplicated", self.exposures_deduplicated()),
            ("exposures_unmarked", self.exposures_unmarked()),
            (
                "evaluations_received",
                n.evaluations_received.load(Ordering::Relaxed),
            ),
            ("trace_bodies_pending", bodies),
            ("exposures_pending", exposures),
            ("evaluations_pending", evaluations),
            ("trace_bytes_held", self.held_bytes()),
        ]
    }

    /// The answer to a [`Kind::Status`] request: `pid`, `gem_version`
    /// and [`Listener::counter_list`], as a JSON object.
    fn status_json(&self) -> Vec<u8> {
        let mut m = serde_json::Map::new();
        m.insert("pid".into(), std::process::id().into());
        m.insert("gem_version".into(), self.gem_version.clone().into());
        for (k, v) in self.counter_list() {
            m.insert(k.into(), v.into());
        }
        serde_json::Value::Object(m).to_string().into_bytes()
    }

    /// Bytes of trace bodies held now.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes.load(Ordering::Acquire)
    }

    /// Connections open now. From the counters, so it takes no lock (a
    /// connection asking for the status holds its own).
    pub fn open_connections(&self) -> usize {
        let n = &self.counters;
        let opened = n.connections.load(Ordering::Acquire);
        opened.saturating_sub(n.closed.load(Ordering::Acquire)) as usize
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a connection (the listener's end of a socketpair, or one
    /// accepted from a named socket): checks its peer, then serves it.
    pub fn adopt(self: &Arc<Self>, stream: UnixStream) {
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = super::peer::check(&stream) {
            self.counters.peers_refused.fetch_add(1, Ordering::Relaxed);
            self.log.outcome(Some(&e.to_string()));
            return;
        }
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            state: Mutex::new(ConnState {
                stream: Some(stream),
                ..Default::default()
            }),
        });
        {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.retain(|c| c.lock().stream.is_some());
            conns.push(conn.clone());
        }
        let token = self.stop.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let (Some(token), Ok((handle, _))) = (token, crate::runtime::handle()) {
            self.spawn(&handle, conn, token);
        }
    }

    fn spawn(self: &Arc<Self>, handle: &Handle, conn: Arc<Conn>, token: CancellationToken) {
        {
            let mut st = conn.lock();
            if st.serving || st.stream.is_none() {
                return;
            }
            st.serving = true;
        }
        handle.spawn(self.clone().serve(conn, token));
    }

    fn close(&self, st: &mut ConnState) {
        if st.stream.take().is_some() {
            self.counters.closed.fetch_add(1, Ordering::Relaxed);
        }
        st.inbuf = BytesMut::new();
        st.outbuf = Vec::new();
    }

    /// Serves one connection until it closes or the runtime stops.
    async fn serve(self: Arc<Self>, conn: Arc<Conn>, stop: CancellationToken) {
        struct Serving(Arc<Conn>);
        impl Drop for Serving {
            fn drop(&mut self) {
                self.0.lock().serving = false;
            }
        }
        let _serving = Serving(conn.clone());
        let dup = conn.lock().stream.as_ref().map(UnixStream::try_clone);
        let stream = match dup {
            Some(Ok(s)) => s
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(s)),
            Some(Err(e)) => Err(e),
            None => return,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                self.log
                    .outcome(Some(&format!("cannot serve a connection: {e}")));
                self.close(&mut conn.lock());
                return;
            }
        };
        loop {
            let writing = !conn.lock().outbuf.is_empty();
            if writing {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = stream.writable() => if r.is_err() {
                        self.close(&mut conn.lock());
                        return;
                    },
                }
                let mut st = conn.lock();
                match stream.try_write(&st.outbuf) {
                    Ok(n) => {
                        st.outbuf.drain(..n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        self.close(&mut st);
                        return;
                    }
                }
                if st.outbuf.is_empty() && st.closing {
                    self.close(&mut st);
                    return;
                }
                continue;
            }
            if STALL.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                r = stream.readable() => if r.is_err() {
                    self.close(&mut conn.lock());
                    return;
                },
            }
            let mut st = conn.lock();
            // Room for the rest of the frame being read at once, so that
            // it lands in one buffer (never moved while it grows).
            let frame_left = match st.greeted {
                true => wire::frame_len(&st.inbuf)
                    .ok()
                    .flatten()
                    .map_or(0, |n| n.saturating_sub(st.inbuf.len())),
                false => 0,
            };
            st.inbuf.reserve(frame_left.max(64 * 1024));
            match stream.try_read_buf(&mut st.inbuf) {
                Ok(0) => {
                    // The worker exited (or was killed): what it handed
                    // over is queued here already.
                    self.close(&mut st);
                    return;
                }
                Ok(_) => {
                    if !self.process(&mut st) {
                        self.close(&mut st);
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.close(&mut st);
                    return;
                }
            }
        }
    }

    /// Handles every whole message in the input buffer; false when the
    /// connection must close now.
    fn process(&self, st: &mut ConnState) -> bool {
        loop {
            if st.closing {
                st.inbuf.clear();
                return true;
            }
            if !st.greeted {
                match Hello::decode(&st.inbuf) {
                    Ok(None) => return true,
                    Ok(Some((hello, used))) => {
                        st.inbuf.advance(used);
                        if hello.gem_version != self.gem_version {
                            self.refuse(
                                st,
                                format!(
                                    "gem version {} is not the listener's ({})",
                                    hello.gem_version, self.gem_version
                                ),
                            );
                            continue;
                        }
                        st.greeted = true;
                        st.outbuf.extend_from_slice(&Welcome::Accept.encode());
                    }
                    Err(e @ WireError::Version { .. }) => {
                        self.refuse(st, e.to_string());
                    }
                    Err(e) => {
                        self.bad_frame(&e);
                        return false;
                    }
                }
                continue;
            }
            let frame = match wire::take_frame(&mut st.inbuf) {
                Ok(None) => return true,
                Ok(Some(f)) => f,
                Err(e) => {
                    self.bad_frame(&e);
                    return false;
                }
            };
            let answer = match frame.kind {
                Kind::Traces => self.traces(&frame.payload),
                Kind::Exposures => self.exposures(&frame.payload),
                Kind::Evaluations => self.evaluations(&frame.payload),
                Kind::Status => Answer::Reply(self.status_json()),
                Kind::Ack | Kind::Nack => Answer::Close(WireError::Malformed("client frame kind")),
            };
            match answer {
                Answer::Ack => {
                    self.counters.acked.fetch_add(1, Ordering::Relaxed);
                    let unmarked = exposures::UNMARKED.load(Ordering::Acquire);
                    wire::encode_frame(
                        &mut st.outbuf,
                        Kind::Ack,
                        frame.seq,
                        &wire::ack_payload(unmarked),
                    );
                }
                Answer::Reply(payload) => {
                    wire::encode_frame(&mut st.outbuf, Kind::Ack, frame.seq, &payload);
                }
                Answer::Nack(reason) => {
                    self.counters.nacked.fetch_add(1, Ordering::Relaxed);
                    wire::encode_frame(&mut st.outbuf, Kind::Nack, frame.seq, reason.as_bytes());
                }
                Answer::Close(e) => {
                    self.bad_frame(&e);
                    return false;
                }
            }
        }
    }

    fn refuse(&self, st: &mut ConnState, reason: String) {
        self.counters
            .handshakes_refused
            .fetch_add(1, Ordering::Relaxed);
        self.log
            .outcome(Some(&format!("refused a worker: {reason}")));
        st.outbuf
            .extend_from_slice(&Welcome::Refuse(reason).encode());
        st.closing = true;
    }

    fn bad_frame(&self, e: &WireError) {
        self.counters.bad_frames.fetch_add(1, Ordering::Relaxed);
        self.log.outcome(Some(&format!("closed a connection: {e}")));
    }

    fn nack_malformed(&self, e: WireError) -> Answer {
        self.counters.bad_frames.fetch_add(1, Ordering::Relaxed);
        Answer::Nack(e.to_string())
    }

    fn traces(&self, payload: &Bytes) -> Answer {
        let t = match wire::Traces::decode(payload) {
            Ok(t) => t,
            Err(e) => return self.nack_malformed(e),
        };
        let Some((count, traces)) = wire::split_v04_body(&t.body) else {
            return self.nack_malformed(WireError::Malformed("v0.4 body"));
        };
        if count != t.trace_count {
            return self.nack_malformed(WireError::Malformed("v0.4 body trace count"));
        }
        let worker = match self.trace_route(&t.route) {
            Ok(w) => w,
            Err(why) => return Answer::Nack(why),
        };
        let len = traces.len() as u64;
        let header = t.body.len() - traces.len();
        let held = self.held_bytes.fetch_add(len, Ordering::AcqRel);
        let guard = Held {
            bytes: len,
            total: self.held_bytes.clone(),
        };
        if held + len > self.limits.held_bytes || !worker.has_room(1) {
            return Answer::Nack("listener buffer full".into());
        }
        let body = Body {
            body: t.body,
            header,
            count,
            _held: guard,
        };
        if !worker.write(body) {
            return Answer::Nack("listener buffer full".into());
        }
        self.counters
            .traces_received
            .fetch_add(u64::from(count), Ordering::Relaxed);
        Answer::Ack
    }

    fn exposures(&self, payload: &[u8]) -> Answer {
        let x = match wire::Exposures::decode(payload) {
            Ok(x) => x,
            Err(e) => return self.nack_malformed(e),
        };
        let worker = match self.exposure_route(&x.route) {
            Ok(w) => w,
            Err(why) => return Answer::Nack(why),
        };
        if !worker.has_room(x.events.len()) {
            return Answer::Nack("listener buffer full".into());
        }
        self.counters
            .exposures_received
            .fetch_add(x.events.len() as u64, Ordering::Relaxed);
        for e in x.events {
            // Deduplicated here, across every worker of the server.
            exposures::record(&worker, e, 0);
        }
        Answer::Ack
    }

    fn evaluations(&self, payload: &[u8]) -> Answer {
        let x = match wire::Evaluations::decode(payload) {
            Ok(x) => x,
            Err(e) => return self.nack_malformed(e),
        };
        let worker = match self.evaluation_route(&x.route) {
            Ok(w) => w,
            Err(why) => return Answer::Nack(why),
        };
        let n: u64 = x.rows.iter().map(|r| r.counts.count).sum();
        self.counters
            .evaluations_received
            .fetch_add(n, Ordering::Relaxed);
        worker.merge_rows(x.rows);
        Answer::Ack
    }

    fn trace_route(&self, route: &TraceRoute) -> Result<Arc<BodyWorker>, String> {
        let mut routes = self.routes();
        if let Some((_, w)) = routes.traces.iter().find(|(r, _)| r == route) {
            return Ok(w.clone());
        }
        routes
            .traces
            .retain(|(_, w)| keep_route(w.stats().queued, || w.stop()));
        if routes.traces.len() >= MAX_ROUTES {
            return Err(format!(
                "listener serves {MAX_ROUTES} trace destinations already"
            ));
        }
        let exporter = TraceExporter::new(AgentConfig {
            url: route.url.clone(),
            lang_version: route.lang_version.clone(),
            lang_interpreter: route.lang_interpreter.clone(),
            tracer_version: route.tracer_version.clone(),
            container_id: route.container_id.clone(),
            ..AgentConfig::default()
        })
        .map_err(|e| format!("bad trace destination: {e}"))?;
        let w = Arc::new(BatchWorker::new(
            BodySink {
                exporter,
                counters: self.counters.clone(),
                spare: Mutex::new(Vec::new()),
            },
            self.limits.bodies,
            // Sent as soon as one arrives: bodies batch up by themselves
            // while a request is in flight.
            1,
            FLUSH_INTERVAL,
            "sidecar listener traces",
        ));
        crate::worker::register(&w).map_err(|e| e.to_string())?;
        routes.traces.push((route.clone(), w.clone()));
        Ok(w)
    }

    fn exposure_route(&self, route: &EvpRoute) -> Result<Arc<ExposureWorker>, String> {
        let mut routes = self.routes();
        if let Some((_, w)) = routes.exposures.iter().find(|(r, _)| r == route) {
            return Ok(w.clone());
        }
        routes
            .exposures
            .retain(|(_, w)| keep_route(w.stats().queued, || w.stop()));
        if routes.exposures.len() >= MAX_ROUTES {
            return Err(format!(
                "listener serves {MAX_ROUTES} exposure destinations already"
            ));
        }
        let sink = EvpSink::new(&route.url, route.context(), Duration::from_secs(3), 65_536)
            .map_err(|e| format!("bad exposures destination: {e}"))?;
        let w = Arc::new(BatchWorker::new(
            super::sink::Sidecar::new(sink),
            self.limits.exposures,
            1,
            FLUSH_INTERVAL,
            "sidecar listener exposures",
        ));
        crate::worker::register(&w).map_err(|e| e.to_string())?;
        routes.exposures.push((route.clone(), w.clone()));
        Ok(w)
    }

    fn evaluation_route(&self, route: &EvpRoute) -> Result<Arc<EvaluationWorker>, String> {
        let mut routes = self.routes();
        if let Some((_, w)) = routes.evaluations.iter().find(|(r, _)| r == route) {
            return Ok(w.clone());
        }
        routes
            .evaluations
            .retain(|(_, w)| keep_route(w.stats().pending, || w.stop()));
        if routes.evaluations.len() >= MAX_ROUTES {
            return Err(format!(
                "listener serves {MAX_ROUTES} evaluation destinations already"
            ));
        }
        let w = Arc::new(
            EvaluationWorker::new(EvaluationConfig {
                url: route.url.clone(),
                context: route.context(),
                timeout: Duration::from_secs(3),
                flush_interval: EVALUATION_WINDOW,
                queue_size: crate::flags::DEFAULT_QUEUE_SIZE,
                max_payload: exposures::MAX_PAYLOAD,
            })
            .map_err(|e| format!("bad evaluations destination: {e}"))?,
        );
        crate::worker::register(&w).map_err(|e| e.to_string())?;
        routes.evaluations.push((route.clone(), w.clone()));
        Ok(w)
    }

    /// Sends everything held now; resolves to true once all of it was
    /// accepted by the agent. Await it under a timeout, on the runtime.
    pub fn flush(&self) -> impl std::future::Future<Output = bool> + Send + 'static {
        let routes = self.routes();
        let traces: Vec<_> = routes.traces.iter().map(|(_, w)| w.flush()).collect();
        let exposures: Vec<_> = routes.exposures.iter().map(|(_, w)| w.flush()).collect();
        let evaluations: Vec<_> = routes.evaluations.iter().map(|(_, w)| w.flush()).collect();
        drop(routes);
        async move {
            let mut ok = true;
            for f in traces {
                ok &= f.await;
            }
            for f in exposures {
                ok &= f.await;
            }
            for f in evaluations {
                ok &= f.await;
            }
            ok
        }
    }

    /// What is still queued here: (trace bodies, exposures, evaluations).
    pub fn pending(&self) -> (u64, u64, u64) {
        let routes = self.routes();
        (
            routes.traces.iter().map(|(_, w)| w.stats().queued).sum(),
            routes.exposures.iter().map(|(_, w)| w.stats().queued).sum(),
            routes
                .evaluations
                .iter()
                .map(|(_, w)| w.stats().pending)
                .sum(),
        )
    }

    /// Exposures the shared dedup suppressed (the same assignment handed
    /// over by several workers).
    pub fn exposures_deduplicated(&self) -> u64 {
        self.routes()
            .exposures
            .iter()
            .map(|(_, w)| w.sink().counters.deduplicated.load(Ordering::Relaxed))
            .sum()
    }

    /// Exposure dedup entries the listener un-marked (their event refused
    /// for good or dropped: the next identical one is sent again).
    pub fn exposures_unmarked(&self) -> u64 {
        self.routes()
            .exposures
            .iter()
            .map(|(_, w)| w.sink().counters.unmarked.load(Ordering::Relaxed))
            .sum()
    }

    /// In a forked child: close every inherited connection (they belong to
    /// the parent) and stop the senders; this listener serves nothing
    /// again.
    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let mut st = c.lock();
            self.close(&mut st);
            st.serving = false;
        }
        let routes = self.routes();
        for (_, w) in &routes.traces {
            w.stop();
        }
        for (_, w) in &routes.exposures {
            w.stop();
        }
        for (_, w) in &routes.evaluations {
            w.stop();
        }
    }
}

impl Worker for Listener {
    fn start(self: Arc<Self>, handle: &Handle) {
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        let token = CancellationToken::new();
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        let conns: Vec<_> = self.conns.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for c in conns {
            self.spawn(handle, c, token.clone());
        }
    }

    /// The connection tasks stop at their next await (the runtime's
    /// shutdown drops them); the connections stay open, their buffers
    /// kept.
    fn pause(&self) {
        if let Some(t) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.cancel();
        }
    }

    fn resume(&self, in_child: bool) {
        if in_child {
            self.retire();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime;
    use crate::sidecar::client::{Client, HandoverError};
    use crate::span::{Span, SpanDefaults, Trace};
    use std::io::{Read, Write};

    fn body(n: usize) -> (Vec<u8>, u32) {
        let traces: Vec<Trace> = (0..n)
            .map(|i| {
                let mut t = Trace::default();
                let name = t.push_str("op");
                t.spans.push(Span {
                    trace_id: i as u128 + 1,
                    span_id: 1,
                    name,
                    ..Default::default()
                });
                t
            })
            .collect();
        let p = crate::split::next_payload(
            &traces,
            &SpanDefaults::default(),
            crate::encode::Protocol::V04,
            1 << 20,
            Vec::new(),
        );
        let p = p.payload.unwrap();
        (p.body, p.trace_count as u32)
    }

    fn traces_frame(n: usize) -> Vec<u8> {
        let (body, trace_count) = body(n);
        wire::Traces {
            route: TraceRoute {
                // Nothing listens there: bodies stay queued (retried).
                url: "http://127.0.0.1:9".into(),
                ..Default::default()
            },
            trace_count,
            body: body.into(),
        }
        .encode()
    }

    fn listener(limits: Limits) -> Arc<Listener> {
        let l = Arc::new(Listener::new("0.1.0", limits));
        crate::worker::register(&l).unwrap();
        l
    }

    fn wait_for(mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn acks_what_it_queued_and_nacks_past_its_limits() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let l = listener(Limits {
            held_bytes: 10_000,
            bodies: 2,
            exposures: 10,
        });
        let (a, b) = UnixStream::pair().unwrap();
        l.adopt(a);
        let c = Client::new(b, "0.1.0");
        let frame = traces_frame(3);
        assert!(c.handover(Kind::Traces, &frame).is_ok());
        assert!(c.handover(Kind::Traces, &frame).is_ok());
        // Two bodies per route at most.
        assert!(matches!(
            c.handover(Kind::Traces, &frame),
            Err(HandoverError::Nack(_))
        ));
        let n = &l.counters;
        assert_eq!(n.traces_received.load(Ordering::SeqCst), 6);
        assert_eq!(
            (
                n.acked.load(Ordering::SeqCst),
                n.nacked.load(Ordering::SeqCst)
            ),
            (2, 1)
        );
        assert!(l.held_bytes() > 0);
        // A body larger than the byte budget is refused, and releases it.
        let before = l.held_bytes();
        let big = traces_frame(400);
        assert!(matches!(
            c.handover(Kind::Traces, &big),
            Err(HandoverError::Nack(_))
        ));
        assert_eq!(l.held_bytes(), before);
        l.retire();
        wait_for(|| l.held_bytes() == 0 || l.pending().0 == 2);
    }

    fn exposures_frame(url: &str, subject: &str) -> Vec<u8> {
        wire::Exposures {
            route: EvpRoute::new(url, &exposures::Context::default()),
            events: vec![exposures::Exposure::new(
                1_700_000_000_000,
                "f",
                "a",
                "on",
                subject,
                &[],
            )],
        }
        .encode()
    }

    fn flush_listener(l: &Listener) -> bool {
        let (h, _) = runtime::handle().unwrap();
        let f = l.flush();
        h.block_on(async { tokio::time::timeout(Duration::from_secs(10), f).await })
            .unwrap_or(false)
    }

    /// The shared dedup marks an exposure only once the agent accepted
    /// it: refused for good, it is un-marked (and the count reaches the
    /// clients in the next Ack); while it waits, repeats from other
    /// workers are suppressed.
    #[test]
    fn an_exposure_the_agent_refused_is_unmarked_and_sent_again() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (h, _) = runtime::handle().unwrap();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (url, bodies) = h.block_on(crate::test_http::gated(vec![400, 202], gate.clone()));
        let l = listener(Limits::default());
        let (a1, b1) = UnixStream::pair().unwrap();
        let (a2, b2) = UnixStream::pair().unwrap();
        l.adopt(a1);
        l.adopt(a2);
        let (w1, w2) = (Client::new(b1, "0.1.0"), Client::new(b2, "0.1.0"));
        // Two workers hand over the same exposure while the agent has not
        // answered the first: one event, the other deduplicated.
        assert!(w1
            .handover(Kind::Exposures, &exposures_frame(&url, "u"))
            .is_ok());
        assert!(w2
            .handover(Kind::Exposures, &exposures_frame(&url, "u"))
            .is_ok());
        assert_eq!(l.exposures_deduplicated(), 1);
        assert_eq!(l.exposures_unmarked(), 0, "pending, not un-marked");
        gate.add_permits(100);
        assert!(!flush_listener(&l), "the agent answered 400");
        assert_eq!(l.exposures_unmarked(), 1);
        // The next Ack carries the count: the client forgets its marks.
        let unmarked = exposures::UNMARKED.load(Ordering::SeqCst);
        let seen_by_listener = exposures::LISTENER_UNMARKED.load(Ordering::SeqCst);
        assert_ne!(seen_by_listener, unmarked);
        assert!(w2
            .handover(Kind::Exposures, &exposures_frame(&url, "u"))
            .is_ok());
        assert_eq!(
            exposures::LISTENER_UNMARKED.load(Ordering::SeqCst),
            unmarked
        );
        // This test process is both sides; a listener's process is never
        // a client, so its own marks never follow this count.
        exposures::LISTENER_UNMARKED.store(seen_by_listener, Ordering::SeqCst);
        // Un-marked: this one is sent, and accepted.
        assert!(flush_listener(&l));
        assert!(w1
            .handover(Kind::Exposures, &exposures_frame(&url, "u"))
            .is_ok());
        assert!(flush_listener(&l));
        assert_eq!(l.exposures_deduplicated(), 2);
        assert_eq!(l.exposures_unmarked(), 1);
        assert_eq!(l.counters.exposures_received.load(Ordering::SeqCst), 4);
        assert_eq!(bodies.lock().unwrap().len(), 2, "sent, refused; sent again");
        l.retire();
    }

    #[test]
    fn a_peer_that_breaks_the_protocol_loses_only_its_connection() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let l = listener(Limits::default());
        let (a1, mut bad) = UnixStream::pair().unwrap();
        let (a2, good) = UnixStream::pair().unwrap();
        l.adopt(a1);
        l.adopt(a2);
        bad.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(bad.read(&mut buf).unwrap(), 0, "closed by the listener");
        wait_for(|| l.counters.bad_frames.load(Ordering::SeqCst) == 1);
        let c = Client::new(good, "0.1.0");
        assert!(c.handover(Kind::Traces, &traces_frame(1)).is_ok());
        // A malformed payload in a good frame is refused, the connection kept.
        assert!(matches!(
            c.handover(Kind::Traces, b"junk"),
            Err(HandoverError::Nack(_))
        ));
        assert!(c.handover(Kind::Traces, &traces_frame(1)).is_ok());
        assert_eq!(l.open_connections(), 1);
        l.retire();
    }

    #[test]
    fn another_gem_or_protocol_version_is_refused_cleanly() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let l = listener(Limits::default());
        let (a, b) = UnixStream::pair().unwrap();
        l.adopt(a);
        let c = Client::new(b, "0.0.9");
        assert!(
            matches!(c.handover(Kind::Traces, &traces_frame(1)), Err(HandoverError::Refused(r)) if r.contains("0.0.9"))
        );
        assert!(c.is_broken());

        let (a, mut b) = UnixStream::pair().unwrap();
        l.adopt(a);
        let mut hello = Hello::ours("0.1.0").encode();
        hello[4..6].copy_from_slice(&2u16.to_le_bytes());
        b.write_all(&hello).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let _ = b.read_to_end(&mut got);
        let (w, _) = Welcome::decode(&got).unwrap().unwrap();
        assert!(matches!(w, Welcome::Refuse(r) if r.contains("version 2")));
        assert_eq!(l.counters.handshakes_refused.load(Ordering::SeqCst), 2);
        l.retire();
    }

    #[test]
    fn connections_survive_a_runtime_restart_mid_frame() {
        let _g = runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let l = listener(Limits::default());
        let (a, mut b) = UnixStream::pair().unwrap();
        l.adopt(a);
        b.write_all(&Hello::ours("0.1.0").encode()).unwrap();
        let mut frame = Vec::new();
        wire::encode_frame(&mut frame, Kind::Traces, 1, &traces_frame(2));
        let (head, tail) = frame.split_at(frame.len() / 2);
        b.write_all(head).unwrap();
        wait_for(|| l.conns.lock().unwrap()[0].lock().inbuf.len() >= head.len());
        runtime::before_fork();
        assert!(runtime::tests::no_threads_left());
        runtime::after_fork_parent();
        b.write_all(tail).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 64];
        while wire::decode_frame(got.get(Welcome::Accept.encode().len()..).unwrap_or(&[]))
            .ok()
            .flatten()
            .is_none()
        {
            let n = b.read(&mut chunk).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        let (f, _) = wire::decode_frame(&got[Welcome::Accept.encode().len()..])
            .unwrap()
            .unwrap();
        assert_eq!((f.kind, f.seq), (Kind::Ack, 1));
        assert_eq!(l.counters.traces_received.load(Ordering::SeqCst), 2);
        l.retire();
    }
}
