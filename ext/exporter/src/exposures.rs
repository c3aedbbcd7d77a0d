//! `Exporter::Exposures`, native half: `_record` reads its arguments
//! under the GVL and hands the event to `exporter_core::exposures` (dedup,
//! then the batch worker that posts to the agent's EVP proxy).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use exporter_core::batch::BatchWorker;
use exporter_core::exposures::{self, Context, EvpSink, Exposure, ExposureWorker, FLUSH_AT};
use exporter_core::span::AttributeValue;
use exporter_core::worker;
use magnus::value::ReprValue;
use magnus::{
    function, method, prelude::*, Error, Integer, RHash, RModule, RString, Ruby, Symbol, Value,
};

use crate::{convert, errors, writer};

#[magnus::wrap(class = "Exporter::Exposures", free_immediately, size)]
pub struct Exposures {
    inner: Arc<ExposureWorker>,
}

/// A required String argument; the error names the field.
fn text(ruby: &Ruby, v: Value, field: &str) -> Result<String, Error> {
    convert::string(ruby, v).map_err(|p| errors::argument(ruby, format!("{field} {p}")))
}

/// A primitive attribute value (String, Integer, Float, true, false), or
/// `None`: left out and counted.
fn attribute(ruby: &Ruby, v: Value) -> Option<AttributeValue> {
    convert::attribute(ruby, v)
        .ok()
        .filter(|a| !matches!(a, AttributeValue::Array(_)))
}

impl Exposures {
    fn native_new(ruby: &Ruby, opts: RHash) -> Result<Exposures, Error> {
        let url: String = errors::option(ruby, opts, "url")?;
        let seconds = |key| errors::seconds(ruby, key, errors::option(ruby, opts, key)?);
        let positive = |key| errors::positive(ruby, key, errors::option(ruby, opts, key)?);
        let timeout = seconds("timeout")?;
        let flush_interval = seconds("flush_interval")?;
        let buffer_size = positive("buffer_size")?;
        let dedup_cache_size = positive("dedup_cache_size")?;
        let max_payload = positive("max_payload_size")?;
        let context = Context {
            service: errors::option(ruby, opts, "service")?,
            env: errors::option(ruby, opts, "env")?,
            version: errors::option(ruby, opts, "version")?,
        };
        let sink = EvpSink::new(&url, context, timeout, dedup_cache_size)
            .map_err(|e| errors::argument(ruby, e))?
            .with_max_payload(max_payload);
        let inner = Arc::new(BatchWorker::new(
            sink,
            buffer_size,
            FLUSH_AT,
            flush_interval,
            "exposures",
        ));
        worker::register(&inner).map_err(|e| errors::argument(ruby, e))?;
        Ok(Exposures { inner })
    }

    /// `_record(flag, allocation, variant, subject_id, attributes, timestamp_ms)`
    #[allow(clippy::too_many_arguments)]
    fn record(
        ruby: &Ruby,
        rb_self: &Self,
        flag: Value,
        allocation: Value,
        variant: Value,
        subject_id: Value,
        attributes: Value,
        timestamp_ms: Value,
    ) -> Result<bool, Error> {
        let flag = text(ruby, flag, "flag")?;
        let allocation = text(ruby, allocation, "allocation")?;
        let variant = text(ruby, variant, "variant")?;
        let subject_id = if let Some(i) = Integer::from_value(subject_id) {
            i.to_string()
        } else {
            text(ruby, subject_id, "subject_id")?
        };
        let timestamp_ms = if timestamp_ms.is_nil() {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0)
        } else {
            Integer::from_value(timestamp_ms)
                .and_then(|i| i.to_i64().ok())
                .ok_or_else(|| {
                    errors::argument(ruby, "timestamp_ms must be an Integer (milliseconds)")
                })?
        };
        let mut attrs = Vec::new();
        let mut left_out = 0u64;
        if !attributes.is_nil() {
            let h = RHash::from_value(attributes)
                .ok_or_else(|| errors::argument(ruby, "subject_attributes must be a Hash"))?;
            h.foreach(|k: Value, v: Value| {
                let key = if let Some(s) = Symbol::from_value(k) {
                    s.name().map(|n| n.into_owned()).ok()
                } else if RString::from_value(k).is_some() {
                    convert::string(ruby, k).ok()
                } else {
                    None
                };
                match (key, attribute(ruby, v)) {
                    (Some(k), Some(v)) => attrs.push((k, v)),
                    _ => left_out += 1,
                }
                Ok(magnus::r_hash::ForEach::Continue)
            })?;
        }
        let event = Exposure {
            timestamp_ms,
            flag,
            allocation,
            variant,
            subject_id,
            attributes: attrs,
        };
        Ok(exposures::record(&rb_self.inner, event, left_out))
    }

    fn flush(ruby: &Ruby, rb_self: &Self, timeout: f64) -> Result<bool, Error> {
        writer::flush(ruby, &rb_self.inner, timeout)
    }

    fn stop_worker(&self) {
        self.inner.stop();
    }

    fn stats(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        let s = rb_self.inner.stats();
        let c = &rb_self.inner.sink().counters;
        writer::stats_hash(
            ruby,
            &[
                ("recorded", c.recorded.load(Ordering::Relaxed)),
                ("deduplicated", c.deduplicated.load(Ordering::Relaxed)),
                ("queued", s.queued),
                ("sent", s.sent),
                ("dropped", s.dropped),
                ("failed", s.failed),
                (
                    "attributes_dropped",
                    c.attributes_dropped.load(Ordering::Relaxed),
                ),
                ("requests", s.requests),
                ("timed_out", s.timed_out),
                ("retries", s.retries),
            ],
            rb_self.inner.last_error(),
        )
    }
}

impl Drop for Exposures {
    /// Collected without `close`: one bounded last send, then the worker
    /// ends (see `BatchWorker::abandon`).
    fn drop(&mut self) {
        self.inner.abandon();
    }
}

pub fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let class = module.define_class("Exposures", ruby.class_object())?;
    class.define_singleton_method("_native_new", function!(Exposures::native_new, 1))?;
    class.define_method("_record", method!(Exposures::record, 6))?;
    class.define_method("_flush", method!(Exposures::flush, 1))?;
    class.define_method("_stop", method!(Exposures::stop_worker, 0))?;
    class.define_method("stats", method!(Exposures::stats, 0))?;
    Ok(())
}
