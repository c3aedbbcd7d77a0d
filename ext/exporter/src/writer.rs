//! `Exporter::Writer`, native half: `write` converts on the caller's thread
//! and queues; the flusher is a background worker of `exporter_core`.
//! The Ruby half (`lib/exporter/writer.rb`) adds defaults, `stop` and the
//! exit-time flush.

use std::sync::Arc;
use std::time::Instant;

use exporter_core::batch::{BatchSink, BatchWorker, TraceWriter, MAX_BATCH};
use exporter_core::sidecar::sink::Sidecar;
use exporter_core::worker;
use magnus::{function, method, prelude::*, Error, RHash, RModule, Ruby, Value};

use crate::gvl::{self, Ran};
use crate::transport::Transport;
use crate::{convert, errors};

#[magnus::wrap(class = "Exporter::Writer", free_immediately, size)]
pub struct Writer {
    inner: Arc<TraceWriter>,
}

impl Writer {
    fn native_new(
        ruby: &Ruby,
        transport: &Transport,
        buffer_size: i64,
        flush_interval: f64,
    ) -> Result<Writer, Error> {
        let capacity = errors::positive(ruby, "buffer_size", buffer_size)?;
        let inner = Arc::new(TraceWriter::new(
            Sidecar::new(transport.exporter()),
            capacity,
            // Send early once half the buffer is used.
            (capacity / 2).min(MAX_BATCH),
            errors::seconds(ruby, "flush_interval", flush_interval)?,
            "trace writer",
        ));
        worker::register(&inner).map_err(|e| errors::argument(ruby, e))?;
        Ok(Writer { inner })
    }

    /// Converts and validates `trace` (raising `InvalidTraceError`), then
    /// queues it. Never blocks on I/O. False when dropped.
    fn write(ruby: &Ruby, rb_self: Value, trace: Value) -> Result<bool, Error> {
        let rb_self = convert::receiver::<Self>(rb_self)?;
        let trace = convert::trace(ruby, trace, 0)?;
        Ok(rb_self.inner.write(trace))
    }

    /// Waits, without the GVL, until everything written so far was sent.
    fn flush(ruby: &Ruby, rb_self: &Self, timeout: f64) -> Result<bool, Error> {
        flush(ruby, &rb_self.inner, timeout)
    }

    fn stop_flusher(&self) {
        self.inner.stop();
    }

    fn stats(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        let s = rb_self.inner.stats();
        stats_hash(
            ruby,
            &[
                ("written", s.written),
                ("sent", s.sent),
                ("dropped", s.dropped),
                ("failed", s.failed),
                ("queued", s.queued),
                ("requests", s.requests),
                ("timed_out", s.timed_out),
                ("retries", s.retries),
            ],
            rb_self.inner.last_error(),
        )
    }
}

/// A batch worker's `stats` Hash: the counters plus `last_error`.
pub fn stats_hash(
    ruby: &Ruby,
    counters: &[(&str, u64)],
    last_error: Option<String>,
) -> Result<RHash, Error> {
    let h = ruby.hash_new();
    for (k, v) in counters {
        h.aset(ruby.to_symbol(k), *v)?;
    }
    h.aset(ruby.to_symbol("last_error"), last_error)?;
    Ok(h)
}

/// Flushes a batch worker (trace writer, exposures): true when everything
/// written so far was accepted within `timeout` seconds. Waits without the
/// GVL.
pub fn flush<T, S>(
    ruby: &Ruby,
    worker: &Arc<BatchWorker<T, S>>,
    timeout: f64,
) -> Result<bool, Error>
where
    T: Send + 'static,
    S: BatchSink<T>,
{
    let limit = errors::wait(ruby, timeout)?;
    let deadline = Instant::now().checked_add(limit);
    let ticket = worker.flush_ticket();
    loop {
        let left = deadline.map_or(limit, |d| d.saturating_duration_since(Instant::now()));
        let flushed = worker.flushed(ticket);
        match gvl::run(ruby, move |_| async move {
            tokio::time::timeout(left, flushed).await.unwrap_or(false)
        })? {
            Ran::Done(ok) => return Ok(ok),
            // A fork stopped the runtime under the wait: the items are
            // still there (the parent sends them), so wait again, on the
            // next runtime, for what remains of the timeout.
            Ran::Abandoned if !left.is_zero() => continue,
            Ran::Abandoned => return Ok(false),
            // Mid-fork (the forking thread let us run): sleep without the
            // GVL so the fork can finish, then wait again.
            Ran::NoRuntime(_) if !left.is_zero() => {
                ruby.thread_sleep(std::time::Duration::from_millis(1).min(left))?
            }
            Ran::NoRuntime(_) => return Ok(false),
        }
    }
}

impl Drop for Writer {
    /// Collected without `stop`: the flusher sends what it holds once
    /// (bounded), then ends, releasing the transport's connections.
    fn drop(&mut self) {
        self.inner.abandon();
    }
}

pub fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let class = module.define_class("Writer", ruby.class_object())?;
    class.define_singleton_method("_native_new", function!(Writer::native_new, 3))?;
    class.define_method("write", method!(Writer::write, 1))?;
    class.define_method("_flush", method!(Writer::flush, 1))?;
    class.define_method("_stop", method!(Writer::stop_flusher, 0))?;
    class.define_method("stats", method!(Writer::stats, 0))?;
    Ok(())
}
