//! `Exporter::Exposures`, native half: `_record` reads its arguments
//! under the GVL and hands the event to `exporter_core::exposures` (dedup,
//! then the batch worker that posts to the agent's EVP proxy).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use exporter_core::batch::BatchWorker;
use exporter_core::exposures::{
    self, Context, DedupKey, EvpSink, ExposureWorker, Packer, FLUSH_AT, MIN_SIZE,
};
use exporter_core::flags::worker::now_ms;
use exporter_core::sidecar::sink::Sidecar;
use exporter_core::worker;
use magnus::value::ReprValue;
use magnus::{function, method, prelude::*, Error, Integer, RHash, RModule, RString, Ruby, Value};

use crate::convert::{self, Scalar};
use crate::{errors, writer};

#[magnus::wrap(class = "Exporter::Exposures", free_immediately, size)]
pub struct Exposures {
    inner: Arc<ExposureWorker>,
}

/// A required String argument's bytes as they are (for the dedup key);
/// the error names the field. Valid until Ruby code runs.
fn bytes<'a>(ruby: &Ruby, v: Value, field: &str) -> Result<&'a [u8], Error> {
    if let Some(text) = convert::ascii_text(v) {
        return Ok(text.as_bytes());
    }
    let s = RString::from_value(v).ok_or_else(|| {
        errors::argument(
            ruby,
            format!("{field} must be a String (got {})", unsafe {
                v.classname()
            }),
        )
    })?;
    // SAFETY: the caller hashes the bytes before any Ruby code can run or
    // any Ruby object is allocated (a GC could move an embedded String).
    Ok(unsafe {
        let b = s.as_slice();
        std::slice::from_raw_parts(b.as_ptr(), b.len())
    })
}

/// Copies a String argument's text, as UTF-8, into the event (the one
/// copy the new path makes); the error names the field.
fn put_text(ruby: &Ruby, p: &mut Packer, v: Value, field: &str) -> Result<(), Error> {
    convert::with_text(ruby, v, |s| p.text(s))
        .map_err(|problem| errors::argument(ruby, format!("{field} {problem}")))
}

/// A subject id: a String, or an Integer written in decimal.
enum SubjectId<'a> {
    Text(Value, &'a [u8]),
    Number(String),
}

impl SubjectId<'_> {
    fn read(ruby: &Ruby, v: Value) -> Result<SubjectId<'_>, Error> {
        match Integer::from_value(v) {
            Some(i) => Ok(SubjectId::Number(match i.to_i64() {
                Ok(n) => n.to_string(),
                Err(_) => i.to_string(),
            })),
            None => bytes(ruby, v, "subject_id").map(|b| SubjectId::Text(v, b)),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            SubjectId::Text(_, b) => b,
            SubjectId::Number(s) => s.as_bytes(),
        }
    }

    fn put(&self, ruby: &Ruby, p: &mut Packer) -> Result<(), Error> {
        match self {
            SubjectId::Text(v, _) => put_text(ruby, p, *v, "subject_id"),
            SubjectId::Number(s) => {
                p.text(s);
                Ok(())
            }
        }
    }
}

/// Bytes an attribute is expected to take packed (the buffer grows for
/// longer ones): a short key and value.
const ATTRIBUTE_BYTES: usize = 32;

/// Packs the subject attributes whose value is a primitive (String,
/// Integer, Float, true, false); returns how many were left out. Nothing
/// nested is walked: an Array or a Hash (cyclic or not, however deep) is
/// left out as it is. Read without an `rb_protect` frame: the callback
/// only reads.
fn put_attributes(ruby: &Ruby, p: &mut Packer, h: Option<RHash>, omit: Option<&str>) -> u64 {
    p.begin_attributes();
    let mut left_out = 0u64;
    if let Some(h) = h {
        convert::each_pair(h, |k, v| {
            if omit.is_some_and(|o| convert::is_string(k, o)) {
                return true;
            }
            if !put_attribute(ruby, p, k, v) {
                left_out += 1;
            }
            true
        });
    }
    left_out
}

/// Packs one attribute; false (nothing written) when it is left out.
fn put_attribute(ruby: &Ruby, p: &mut Packer, k: Value, v: Value) -> bool {
    let Ok(value) = convert::scalar_of(ruby, v) else {
        return false;
    };
    let mark = p.mark();
    if convert::key_with(ruby, k, |s| p.key(s)).is_err() {
        return false;
    }
    match value {
        Scalar::Bool(b) => p.bool(b),
        Scalar::Int(i) => p.int(i),
        Scalar::Float(f) => p.float(f),
        Scalar::String(s) => {
            if convert::with_text(ruby, s.as_value(), |s| p.string(s)).is_err() {
                p.truncate(mark);
                return false;
            }
        }
    }
    true
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
            Sidecar::new(sink),
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
        rb_self: Value,
        flag: Value,
        allocation: Value,
        variant: Value,
        subject_id: Value,
        attributes: Value,
        timestamp_ms: Value,
    ) -> Result<bool, Error> {
        let this = convert::receiver::<Exposures>(rb_self)?;
        this.record_event(
            ruby,
            [flag, allocation, variant, subject_id],
            attributes,
            timestamp_ms,
            None,
        )
    }

    /// An exposure for the OpenFeature hook: the evaluation context's
    /// fields are the subject's attributes, its targeting key left out
    /// (fields that are not a Hash give none). As `Exposures#record` does
    /// otherwise; no Ruby code runs.
    pub(crate) fn record_from_hook(
        ruby: &Ruby,
        exposures: Value,
        texts: [Value; 4],
        fields: Value,
        targeting_key: &str,
    ) -> Result<bool, Error> {
        let this = convert::receiver::<Exposures>(exposures)?;
        let attributes = if RHash::from_value(fields).is_some() {
            fields
        } else {
            ruby.qnil().as_value()
        };
        this.record_event(
            ruby,
            texts,
            attributes,
            ruby.qnil().as_value(),
            Some(targeting_key),
        )
    }

    /// Dedups and queues one exposure: `texts` are the flag, allocation,
    /// variant and subject id; `omit` an attribute key left out.
    fn record_event(
        &self,
        ruby: &Ruby,
        texts: [Value; 4],
        attributes: Value,
        timestamp_ms: Value,
        omit: Option<&str>,
    ) -> Result<bool, Error> {
        let [flag, allocation, variant, subject_id] = texts;
        // Arguments are checked and hashed as they are: a duplicate (the
        // common case) costs a hash and a lookup, and copies nothing.
        // The subject first: a Bignum id allocates its decimal String.
        let subject = SubjectId::read(ruby, subject_id)?;
        let texts = [
            bytes(ruby, flag, "flag")?,
            subject.bytes(),
            bytes(ruby, allocation, "allocation")?,
            bytes(ruby, variant, "variant")?,
        ];
        let key = DedupKey::new(texts[0], texts[1], texts[2], texts[3]);
        let text_bytes: usize = texts.iter().map(|t| t.len()).sum();
        let timestamp_ms = if timestamp_ms.is_nil() {
            None
        } else {
            Some(
                Integer::from_value(timestamp_ms)
                    .and_then(|i| i.to_i64().ok())
                    .ok_or_else(|| {
                        errors::argument(ruby, "timestamp_ms must be an Integer (milliseconds)")
                    })?,
            )
        };
        let attributes = if attributes.is_nil() {
            None
        } else {
            Some(
                RHash::from_value(attributes)
                    .ok_or_else(|| errors::argument(ruby, "subject_attributes must be a Hash"))?,
            )
        };
        let Some(admitted) = exposures::admit(&self.inner, key) else {
            return Ok(false);
        };
        // New: each text copied once, into the event's one buffer.
        // A guess (a hostile Hash of millions of entries reserves no more
        // than a request can carry: such an event grows as it is written).
        let capacity =
            (MIN_SIZE + text_bytes + attributes.map_or(0, |h| h.len() * ATTRIBUTE_BYTES))
                .min(exposures::MAX_PAYLOAD);
        let mut p = Packer::new(capacity, timestamp_ms.unwrap_or_else(now_ms));
        let left_out = (|| {
            put_text(ruby, &mut p, flag, "flag")?;
            put_text(ruby, &mut p, allocation, "allocation")?;
            put_text(ruby, &mut p, variant, "variant")?;
            subject.put(ruby, &mut p)?;
            Ok::<_, Error>(put_attributes(ruby, &mut p, attributes, omit))
        })();
        match left_out {
            Ok(left_out) => Ok(exposures::queue(
                &self.inner,
                admitted,
                p.finish(),
                left_out,
            )),
            Err(e) => {
                exposures::unadmit(&self.inner, admitted);
                Err(e)
            }
        }
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
                ("unmarked", c.unmarked.load(Ordering::Relaxed)),
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
