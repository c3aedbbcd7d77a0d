//! `Exporter::Exposures`, native half: `_record` reads its arguments
//! under the GVL and hands the event to `exporter_core::exposures` (dedup,
//! then the batch worker that posts to the agent's EVP proxy).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use exporter_core::batch::BatchWorker;
use exporter_core::exposures::{self, Context, EvpSink, Exposure, ExposureWorker, FLUSH_AT};
use exporter_core::span::AttributeValue;
use exporter_core::worker::{self, Worker};
use magnus::rb_sys::AsRawValue;
use magnus::value::ReprValue;
use magnus::{
    function, method, prelude::*, Error, Float, Integer, RHash, RModule, RString, Ruby, Symbol,
    Value,
};

use crate::{convert, errors, writer};

#[magnus::wrap(class = "Exporter::Exposures", free_immediately, size)]
pub struct Exposures {
    inner: Arc<ExposureWorker>,
}

/// A required String argument; the error names the field.
fn text(ruby: &Ruby, v: Value, field: &str) -> Result<String, Error> {
    if RString::from_value(v).is_none() {
        return Err(errors::argument(
            ruby,
            format!("{field} must be a String (got {})", unsafe {
                v.classname()
            }),
        ));
    }
    convert::string(ruby, v).map_err(|p| errors::argument(ruby, format!("{field} {p}")))
}

/// A primitive attribute value, or `None` (left out and counted).
fn attribute(ruby: &Ruby, v: Value) -> Option<AttributeValue> {
    if v.as_raw() == ruby.qtrue().as_value().as_raw() {
        return Some(AttributeValue::Bool(true));
    }
    if v.as_raw() == ruby.qfalse().as_value().as_raw() {
        return Some(AttributeValue::Bool(false));
    }
    if let Some(i) = Integer::from_value(v) {
        return i.to_i64().ok().map(AttributeValue::Int);
    }
    if let Some(f) = Float::from_value(v) {
        return Some(AttributeValue::Float(f.to_f64()));
    }
    if RString::from_value(v).is_some() {
        return convert::string(ruby, v).ok().map(AttributeValue::String);
    }
    None
}

impl Exposures {
    fn native_new(ruby: &Ruby, opts: RHash) -> Result<Exposures, Error> {
        let url: String = errors::option(ruby, opts, "url")?;
        let timeout: f64 = errors::option(ruby, opts, "timeout")?;
        let flush_interval: f64 = errors::option(ruby, opts, "flush_interval")?;
        let buffer_size: i64 = errors::option(ruby, opts, "buffer_size")?;
        let dedup_cache_size: i64 = errors::option(ruby, opts, "dedup_cache_size")?;
        let max_payload: i64 = errors::option(ruby, opts, "max_payload_size")?;
        for (name, v) in [("timeout", timeout), ("flush_interval", flush_interval)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(errors::argument(
                    ruby,
                    format!("{name} must be a positive number of seconds"),
                ));
            }
        }
        for (name, v) in [
            ("buffer_size", buffer_size),
            ("dedup_cache_size", dedup_cache_size),
            ("max_payload_size", max_payload),
        ] {
            if v <= 0 {
                return Err(errors::argument(ruby, format!("{name} must be positive")));
            }
        }
        let context = Context {
            service: errors::option(ruby, opts, "service")?,
            env: errors::option(ruby, opts, "env")?,
            version: errors::option(ruby, opts, "version")?,
        };
        let sink = EvpSink::new(
            &url,
            context,
            Duration::from_secs_f64(timeout),
            dedup_cache_size as usize,
        )
        .map_err(|e| errors::argument(ruby, e))?
        .with_max_payload(max_payload as usize);
        let inner = Arc::new(BatchWorker::new(
            sink,
            buffer_size as usize,
            FLUSH_AT,
            Duration::from_secs_f64(flush_interval),
            "exposures",
        ));
        let as_worker: Arc<dyn Worker> = inner.clone();
        worker::register(&as_worker).map_err(|e| errors::argument(ruby, e))?;
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
        let h = ruby.hash_new();
        for (k, v) in [
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
        ] {
            h.aset(ruby.to_symbol(k), v)?;
        }
        h.aset(ruby.to_symbol("last_error"), rb_self.inner.last_error())?;
        Ok(h)
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
