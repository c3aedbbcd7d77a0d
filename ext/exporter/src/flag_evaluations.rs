//! `Exporter::FlagEvaluations`, native half: `_record` captures its
//! arguments under the GVL (Strings copied, the context walked with a depth
//! bound, cycles cut, a node budget; no Ruby code is ever called) and
//! queues an `Evaluation`; aggregation, keying, privacy and HTTP run in
//! `exporter_core::flags` on the shared runtime. With the killswitch on
//! there is no worker at all: `_record` returns false.

use std::sync::Arc;
use std::time::Duration;

use exporter_core::exposures::Context;
use exporter_core::flags::aggregate::Evaluation;
use exporter_core::flags::context::{Captured, MAX_CAPTURED_NODES, MAX_CHARS, MAX_DEPTH};
use exporter_core::flags::worker::{now_ms, Config, EvaluationWorker};
use exporter_core::worker;
use magnus::rb_sys::AsRawValue;
use magnus::value::ReprValue;
use magnus::{
    function, method, prelude::*, Error, Float, Integer, RArray, RHash, RModule, RString, Ruby,
    Symbol, Value,
};

use crate::gvl::{self, Ran};

/// Evaluation times the intake accepts (its schema's minimum), up to the
/// largest integer JSON readers keep exact.
const TIMESTAMP_RANGE: std::ops::RangeInclusive<i64> = 1_759_276_800_000..=(1 << 53);
use crate::{convert, errors, writer};

#[magnus::wrap(class = "Exporter::FlagEvaluations", free_immediately, size)]
pub struct FlagEvaluations {
    /// `None` when disabled by the killswitch.
    inner: Option<Arc<EvaluationWorker>>,
}

/// The key the OpenFeature hook leaves out of a context's fields.
const TARGETING_KEY: &str = "targeting_key";

/// An optional String (or Symbol) argument; the error names it.
fn opt_text(ruby: &Ruby, v: Value, name: &str) -> Result<Option<String>, Error> {
    if v.is_nil() {
        return Ok(None);
    }
    if let Some(s) = Symbol::from_value(v) {
        return Ok(Some(s.name()?.into_owned()));
    }
    convert::string(ruby, v)
        .map(Some)
        .map_err(|p| errors::argument(ruby, format!("{name} {p}")))
}

/// A text of at most `MAX_CHARS` characters from a String or Symbol, else
/// `None` (skipped). Bytes bound characters from above, so only long
/// Strings are counted.
fn short_text(ruby: &Ruby, v: Value) -> Option<String> {
    let text = if let Some(sym) = Symbol::from_value(v) {
        sym.name().ok()?.into_owned()
    } else {
        let s = RString::from_value(v)?;
        if s.len() > MAX_CHARS && s.length() > MAX_CHARS {
            return None;
        }
        convert::string(ruby, v).ok()?
    };
    (text.len() <= MAX_CHARS || text.chars().count() <= MAX_CHARS).then_some(text)
}

/// Walks a context on the calling thread. Only values that can be kept
/// are copied; containers nest at most `MAX_DEPTH` levels below the top,
/// a container that is its own ancestor is skipped, and at most
/// `MAX_CAPTURED_NODES` values are visited.
struct Capture<'r> {
    ruby: &'r Ruby,
    budget: usize,
    ancestors: Vec<usize>,
}

impl Capture<'_> {
    fn enter(&mut self, v: Value) -> bool {
        let id = v.as_raw() as usize;
        if self.ancestors.contains(&id) {
            return false;
        }
        self.ancestors.push(id);
        true
    }

    fn hash(
        &mut self,
        h: RHash,
        depth: usize,
        skip_targeting_key: bool,
    ) -> Result<Vec<(String, Captured)>, Error> {
        let mut out = Vec::with_capacity(h.len().min(MAX_CAPTURED_NODES));
        if !self.enter(h.as_value()) {
            return Ok(out);
        }
        h.foreach(|k: Value, v: Value| {
            if self.budget == 0 {
                return Ok(magnus::r_hash::ForEach::Stop);
            }
            self.budget -= 1;
            let Some(key) = short_text(self.ruby, k) else {
                return Ok(magnus::r_hash::ForEach::Continue);
            };
            if skip_targeting_key && key == TARGETING_KEY {
                return Ok(magnus::r_hash::ForEach::Continue);
            }
            if let Some(value) = self.value(v, depth)? {
                out.push((key, value));
            }
            Ok(magnus::r_hash::ForEach::Continue)
        })?;
        self.ancestors.pop();
        Ok(out)
    }

    fn array(&mut self, a: RArray, depth: usize) -> Result<Vec<Captured>, Error> {
        let mut out = Vec::new();
        if !self.enter(a.as_value()) {
            return Ok(out);
        }
        let mut i = 0;
        // Re-read the length each time: nothing here runs Ruby code, but
        // the bound stays right whatever the Array does.
        while i < a.len() && self.budget > 0 {
            self.budget -= 1;
            let v: Value = a.entry(i as isize)?;
            // A skipped value keeps its position: the others keep their index.
            out.push(self.value(v, depth)?.unwrap_or(Captured::Skipped));
            i += 1;
        }
        self.ancestors.pop();
        Ok(out)
    }

    /// The captured value at `depth` (its parent's depth + 1 is where its
    /// own children would be), or `None` when it is not kept.
    fn value(&mut self, v: Value, depth: usize) -> Result<Option<Captured>, Error> {
        let ruby = self.ruby;
        if v.as_raw() == ruby.qtrue().as_raw() {
            return Ok(Some(Captured::Bool(true)));
        }
        if v.as_raw() == ruby.qfalse().as_raw() {
            return Ok(Some(Captured::Bool(false)));
        }
        if let Some(i) = Integer::from_value(v) {
            return Ok(i.to_i64().ok().map(Captured::Int));
        }
        if let Some(f) = Float::from_value(v) {
            let f = f.to_f64();
            return Ok(f.is_finite().then_some(Captured::Float(f)));
        }
        if RString::from_value(v).is_some() || Symbol::from_value(v).is_some() {
            return Ok(short_text(ruby, v).map(Captured::Str));
        }
        if depth >= MAX_DEPTH {
            return Ok(None);
        }
        if let Some(h) = RHash::from_value(v) {
            return Ok(Some(Captured::Map(self.hash(h, depth + 1, false)?)));
        }
        if let Some(a) = RArray::from_value(v) {
            return Ok(Some(Captured::List(self.array(a, depth + 1)?)));
        }
        Ok(None)
    }
}

impl FlagEvaluations {
    fn native_new(ruby: &Ruby, opts: RHash) -> Result<FlagEvaluations, Error> {
        let enabled: bool = errors::option(ruby, opts, "enabled")?;
        if !enabled {
            return Ok(FlagEvaluations { inner: None });
        }
        let seconds = |key| errors::seconds(ruby, key, errors::option(ruby, opts, key)?);
        let positive = |key| errors::positive(ruby, key, errors::option(ruby, opts, key)?);
        let config = Config {
            url: errors::option(ruby, opts, "url")?,
            context: Context {
                service: errors::option(ruby, opts, "service")?,
                env: errors::option(ruby, opts, "env")?,
                version: errors::option(ruby, opts, "version")?,
            },
            timeout: seconds("timeout")?,
            flush_interval: seconds("flush_interval")?,
            queue_size: positive("queue_size")?,
            max_payload: positive("max_payload_size")?,
        };
        let inner = Arc::new(EvaluationWorker::new(config).map_err(|e| errors::argument(ruby, e))?);
        worker::register(&inner).map_err(|e| errors::argument(ruby, e))?;
        Ok(FlagEvaluations { inner: Some(inner) })
    }

    /// `_record(flag, variant, allocation, targeting_key, context,
    /// error_code, error_message, timestamp_ms, full_data, from_hook)`
    fn record(ruby: &Ruby, rb_self: &Self, args: &[Value]) -> Result<bool, Error> {
        let Some(inner) = &rb_self.inner else {
            return Ok(false);
        };
        let &[flag, variant, allocation, targeting_key, context, error_code, error_message, timestamp_ms, full_data, from_hook] =
            args
        else {
            return Err(errors::argument(ruby, "_record takes 10 arguments"));
        };
        let flag = opt_text(ruby, flag, "flag")?
            .ok_or_else(|| errors::argument(ruby, "flag must be a String (got nil)"))?;
        let targeting_key = match Integer::from_value(targeting_key) {
            Some(i) => Some(i.to_string()),
            None => opt_text(ruby, targeting_key, "targeting_key")?,
        };
        let full_data = full_data.as_raw() == ruby.qtrue().as_raw();
        let context = if context.is_nil() {
            Vec::new()
        } else {
            let h = RHash::from_value(context)
                .ok_or_else(|| errors::argument(ruby, "context must be a Hash or nil"))?;
            if full_data {
                let mut capture = Capture {
                    ruby,
                    budget: MAX_CAPTURED_NODES,
                    ancestors: Vec::new(),
                };
                capture.hash(h, 0, from_hook.to_bool())?
            } else {
                // Without consent no context is kept: not even walked.
                Vec::new()
            }
        };
        let timestamp_ms = if timestamp_ms.is_nil() {
            now_ms()
        } else {
            let ms = Integer::from_value(timestamp_ms)
                .and_then(|i| i.to_i64().ok())
                .filter(|ms| TIMESTAMP_RANGE.contains(ms));
            match ms {
                Some(ms) => ms,
                // Metadata from a provider: not the application's mistake.
                None if from_hook.to_bool() => now_ms(),
                // The intake refuses a whole body holding a row outside
                // this range: refuse the one evaluation instead.
                None => {
                    return Err(errors::argument(
                        ruby,
                        format!(
                            "timestamp_ms must be an Integer of milliseconds since the epoch, \
                             from {} (2025-10-01) to 2^53",
                            TIMESTAMP_RANGE.start()
                        ),
                    ))
                }
            }
        };
        let e = Evaluation {
            flag,
            variant: opt_text(ruby, variant, "variant")?,
            allocation: opt_text(ruby, allocation, "allocation")?,
            targeting_key,
            context,
            error_code: opt_text(ruby, error_code, "error_code")?,
            error_message: opt_text(ruby, error_message, "error_message")?,
            timestamp_ms,
            full_data,
        };
        Ok(inner.record(e))
    }

    /// Counts a failure of the OpenFeature hook (logged once).
    fn hook_failed(ruby: &Ruby, rb_self: &Self, problem: Value) -> Result<(), Error> {
        if let Some(inner) = &rb_self.inner {
            let text = convert::string(ruby, problem).unwrap_or_else(|_| "unknown".into());
            inner.hook_failed(&text);
        }
        Ok(())
    }

    /// Waits, without the GVL, until everything recorded so far was sent.
    fn flush(ruby: &Ruby, rb_self: &Self, timeout: f64) -> Result<bool, Error> {
        let Some(inner) = &rb_self.inner else {
            return Ok(true);
        };
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(errors::argument(
                ruby,
                "timeout must be a non-negative number of seconds",
            ));
        }
        let flushed = inner.flush();
        let limit = Duration::from_secs_f64(timeout);
        Ok(matches!(
            gvl::run(ruby, move |_| async move {
                tokio::time::timeout(limit, flushed).await.unwrap_or(false)
            })?,
            Ran::Done(true)
        ))
    }

    fn stop_worker(&self) {
        if let Some(inner) = &self.inner {
            inner.stop();
        }
    }

    fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    fn stats(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        let s = rb_self
            .inner
            .as_ref()
            .map(|i| i.stats())
            .unwrap_or_default();
        writer::stats_hash(
            ruby,
            &[
                ("recorded", s.recorded),
                ("sent", s.sent),
                ("dropped", s.dropped),
                ("degraded", s.degraded),
                ("failed", s.failed),
                ("pending", s.pending),
                ("requests", s.requests),
                ("panics", s.panics),
                ("hook_failures", s.hook_failures),
            ],
            rb_self.inner.as_ref().and_then(|i| i.last_error()),
        )
    }
}

pub fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let class = module.define_class("FlagEvaluations", ruby.class_object())?;
    class.define_singleton_method("_native_new", function!(FlagEvaluations::native_new, 1))?;
    class.define_method("_record", method!(FlagEvaluations::record, -1))?;
    class.define_method("_hook_failed", method!(FlagEvaluations::hook_failed, 1))?;
    class.define_method("_flush", method!(FlagEvaluations::flush, 1))?;
    class.define_method("_stop", method!(FlagEvaluations::stop_worker, 0))?;
    class.define_method("enabled?", method!(FlagEvaluations::enabled, 0))?;
    class.define_method("stats", method!(FlagEvaluations::stats, 0))?;
    Ok(())
}
