//! The sink a worker process's batch workers send through: the sidecar
//! first, direct for whatever it did not acknowledge.
//!
//! [`Sidecar`] wraps a direct sink. With no sidecar client in the process
//! (direct mode, a listener, `EXPORTER_SIDECAR=off`) it is the direct sink
//! and nothing else. In a client it encodes the batch (trace bodies as the
//! direct path would send them, exposure events), hands each piece over,
//! and sends direct only the part not acknowledged; the batch worker's
//! accounting sees one report either way ("sent" = accepted by the agent
//! or held by the listener).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::client::{Client, HANDOVER_TIMEOUT};
use super::wire::{self, EvpRoute, Kind, TraceRoute};
use super::COUNTERS;
use crate::agent::{SendReport, TraceExporter};
use crate::batch::BatchSink;
use crate::encode::Protocol;
use crate::exposures::{EvpSink, Exposure};
use crate::span::Trace;
use crate::split::next_payload;
use std::sync::Arc;

/// A direct sink behind the sidecar.
pub struct Sidecar<S> {
    inner: S,
}

impl<S> Sidecar<S> {
    pub fn new(inner: S) -> Sidecar<S> {
        Sidecar { inner }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S> std::ops::Deref for Sidecar<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.inner
    }
}

/// Folds the report of the direct send of `batch[offset..]` into `report`.
fn merge_direct(report: &mut SendReport, direct: SendReport, offset: usize) {
    report.trace_count += direct.trace_count;
    report.failed_traces += direct.failed_traces;
    report.oversized_traces += direct.oversized_traces;
    report.timed_out_traces += direct.timed_out_traces;
    report.retry_from = direct.retry_from.map(|i| i + offset);
    report.requests += direct.requests;
    report.status = direct.status.or(report.status);
    report.rate_by_service = direct.rate_by_service;
    if let Some(e) = direct.error {
        report.note_error(e);
    }
}

fn trace_route(e: &TraceExporter) -> TraceRoute {
    let c = e.config();
    TraceRoute {
        url: c.url.clone(),
        lang_version: c.lang_version.clone(),
        lang_interpreter: c.lang_interpreter.clone(),
        tracer_version: c.tracer_version.clone(),
        container_id: c.container_id.clone(),
    }
}

/// Hands over what it can of `batch`; returns the report so far and the
/// index of the first trace not handed over. Runs as a task of the
/// runtime: the waits for the listener are the reactor's.
async fn hand_over_traces(
    client: &Client,
    e: &TraceExporter,
    batch: &[Trace],
) -> (SendReport, usize) {
    let c = e.config();
    let route = trace_route(e);
    let mut report = SendReport::default();
    let mut offset = 0;
    // The body is encoded into a buffer kept by the client and written
    // from there after the payload head (no copy); the head is small.
    let mut buf = client.take_spare();
    let mut head = Vec::with_capacity(256);
    while offset < batch.len() {
        let next = next_payload(
            &batch[offset..],
            &c.defaults,
            Protocol::V04,
            c.max_payload,
            buf,
        );
        buf = Vec::new();
        if let Some(p) = next.payload {
            let count = p.trace_count;
            head.clear();
            wire::Traces::encode_head(&mut head, &route, count as u32, p.body.len());
            let handed = client
                .handover_parts_async(Kind::Traces, &head, &p.body)
                .await;
            buf = p.body;
            if handed.is_err() {
                COUNTERS.fallback_batches.fetch_add(1, Ordering::Relaxed);
                break;
            }
            report.trace_count += count;
            COUNTERS
                .traces_handed_over
                .fetch_add(count as u64, Ordering::Relaxed);
        }
        report.note_oversized(next.oversized_traces, c.max_payload);
        offset += next.consumed;
    }
    client.keep_spare(buf);
    (report, offset)
}

impl BatchSink<Trace> for Sidecar<Arc<TraceExporter>> {
    async fn send(&self, batch: &[Trace], generation: u64, stop: &CancellationToken) -> SendReport {
        let e = &self.inner;
        // v0.5 bodies cannot be merged by the listener: they go direct.
        let client = (e.config().protocol == Protocol::V04 && !e.is_closed())
            .then(super::acquire)
            .flatten();
        let Some(client) = client else {
            return TraceExporter::send(e, batch, generation, Some(stop)).await;
        };
        let (mut report, offset) = hand_over_traces(&client, e, batch).await;
        if offset < batch.len() {
            COUNTERS
                .traces_direct
                .fetch_add((batch.len() - offset) as u64, Ordering::Relaxed);
            let direct = TraceExporter::send(e, &batch[offset..], generation, Some(stop)).await;
            merge_direct(&mut report, direct, offset);
        }
        report
    }

    fn attempt_timeout(&self) -> Duration {
        self.inner.attempt_timeout() + HANDOVER_TIMEOUT
    }

    fn recycle(&self, traces: Vec<Trace>) {
        crate::span::TRACE_POOL.give(traces);
    }

    fn reset_in_child(&self) {
        BatchSink::<Trace>::reset_in_child(&self.inner);
    }
}

/// Events per exposures frame at most (a frame stays far under its cap).
const EXPOSURES_PER_FRAME: usize = 1_000;

impl BatchSink<Exposure> for Sidecar<EvpSink> {
    async fn send(
        &self,
        batch: &[Exposure],
        generation: u64,
        stop: &CancellationToken,
    ) -> SendReport {
        let Some(client) = super::acquire() else {
            return self.inner.send(batch, generation, stop).await;
        };
        let route = EvpRoute::new(self.inner.url(), self.inner.context());
        let mut report = SendReport::default();
        let mut offset = 0;
        while offset < batch.len() {
            let end = (offset + EXPOSURES_PER_FRAME).min(batch.len());
            let frame = wire::Exposures::encode_events(&route, &batch[offset..end]);
            if client
                .handover_async(Kind::Exposures, &frame)
                .await
                .is_err()
            {
                COUNTERS.fallback_batches.fetch_add(1, Ordering::Relaxed);
                break;
            }
            report.trace_count += end - offset;
            COUNTERS
                .exposures_handed_over
                .fetch_add((end - offset) as u64, Ordering::Relaxed);
            offset = end;
        }
        if offset < batch.len() {
            COUNTERS
                .exposures_direct
                .fetch_add((batch.len() - offset) as u64, Ordering::Relaxed);
            let direct = self.inner.send(&batch[offset..], generation, stop).await;
            merge_direct(&mut report, direct, offset);
        }
        report
    }

    fn attempt_timeout(&self) -> Duration {
        self.inner.attempt_timeout() + HANDOVER_TIMEOUT
    }

    fn discarded(&self, items: &[Exposure]) {
        self.inner.discarded(items);
    }

    fn reset_in_child(&self) {
        self.inner.reset_in_child();
    }
}
