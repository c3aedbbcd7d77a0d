//! `Exporter::FlagEvaluations`, native half: `_record` captures its
//! arguments under the GVL (Strings copied, the context walked with a depth
//! bound, cycles cut, a node budget; no Ruby code is ever called) and
//! queues an `Evaluation`; aggregation, keying, privacy and HTTP run in
//! `exporter_core::flags` on the shared runtime. With the killswitch on
//! there is no worker at all: `_record` returns false.

use std::sync::Arc;

use exporter_core::exposures::Context;
use exporter_core::flags::context::{MAX_CAPTURED_NODES, MAX_CHARS, MAX_DEPTH};
use exporter_core::flags::packed::Packer;
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

/// An optional String (or Symbol) argument, packed; the error names it.
fn put_text(ruby: &Ruby, p: &mut Packer, v: Value, name: &str) -> Result<(), Error> {
    if v.is_nil() {
        p.none();
        return Ok(());
    }
    if RString::from_value(v).is_none() && Symbol::from_value(v).is_none() {
        // SAFETY: the class name is copied before any Ruby code can run.
        let class = unsafe { v.classname() }.into_owned();
        return Err(errors::argument(
            ruby,
            format!("{name} must be a String (got {class})"),
        ));
    }
    convert::key_with(ruby, v, |s| p.text(s))
        .map_err(|problem| errors::argument(ruby, format!("{name} {problem}")))
}

/// Whether a text is at most `MAX_CHARS` characters (bytes bound
/// characters from above, so only long ones are counted).
fn short(s: &str) -> bool {
    s.len() <= MAX_CHARS || s.chars().count() <= MAX_CHARS
}

/// Walks a context on the calling thread, writing what can be kept
/// straight into the evaluation's one buffer (see `flags::packed`).
/// Containers nest at most `MAX_DEPTH` levels below the top, a container
/// that is its own ancestor is kept empty, and at most
/// `MAX_CAPTURED_NODES` values are visited. Hashes are read without an
/// `rb_protect` frame per entry (`convert::each_pair`): nothing here runs
/// Ruby code or raises.
struct Capture<'r, 'p> {
    ruby: &'r Ruby,
    packer: &'p mut Packer,
    budget: usize,
    /// The containers being walked (at most the top and `MAX_DEPTH`).
    ancestors: [rb_sys::VALUE; MAX_DEPTH + 1],
    depth: usize,
}

impl Capture<'_, '_> {
    fn enter(&mut self, v: Value) -> bool {
        let id = v.as_raw();
        if self.ancestors[..self.depth].contains(&id) || self.depth == self.ancestors.len() {
            return false;
        }
        self.ancestors[self.depth] = id;
        self.depth += 1;
        true
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Packs a String or Symbol of at most `MAX_CHARS` characters; false
    /// (nothing written) for anything else.
    fn text(&mut self, v: Value) -> bool {
        if let Some(s) = RString::from_value(v) {
            if s.len() > 4 * MAX_CHARS {
                return false;
            }
        } else if Symbol::from_value(v).is_none() {
            return false;
        }
        let packer = &mut *self.packer;
        convert::key_with(self.ruby, v, |s| {
            let kept = short(s);
            if kept {
                packer.text(s);
            }
            kept
        })
        .unwrap_or(false)
    }

    fn hash(&mut self, h: RHash, depth: usize, skip_targeting_key: bool) {
        let opened = self.packer.begin_map();
        let mut count = 0u32;
        if self.enter(h.as_value()) {
            convert::each_pair(h, |k, v| {
                if self.budget == 0 {
                    return false;
                }
                self.budget -= 1;
                let mark = self.packer.mark();
                let packer = &mut *self.packer;
                let key = convert::key_with(self.ruby, k, |s| {
                    let kept = short(s) && !(skip_targeting_key && s == TARGETING_KEY);
                    if kept {
                        packer.key(s);
                    }
                    kept
                });
                if key != Ok(true) {
                    return true;
                }
                if self.value(v, depth) {
                    count += 1;
                } else {
                    self.packer.truncate(mark);
                }
                true
            });
            self.leave();
        }
        self.packer.end(opened, count);
    }

    fn array(&mut self, a: RArray, depth: usize) {
        let opened = self.packer.begin_list();
        let mut count = 0u32;
        if self.enter(a.as_value()) {
            // Re-read the length each time: nothing here runs Ruby code,
            // but the bound stays right whatever the Array does.
            while (count as usize) < a.len() && self.budget > 0 {
                self.budget -= 1;
                let Ok(v) = a.entry::<Value>(count as isize) else {
                    break;
                };
                // A skipped value keeps its position: the others keep their index.
                if !self.value(v, depth) {
                    self.packer.skipped();
                }
                count += 1;
            }
            self.leave();
        }
        self.packer.end(opened, count);
    }

    /// Packs the value at `depth` (its parent's depth + 1 is where its own
    /// children would be); false, with nothing written, when not kept.
    fn value(&mut self, v: Value, depth: usize) -> bool {
        let ruby = self.ruby;
        if v.as_raw() == ruby.qtrue().as_raw() || v.as_raw() == ruby.qfalse().as_raw() {
            self.packer.bool(v.as_raw() == ruby.qtrue().as_raw());
            return true;
        }
        if let Some(i) = convert::fixnum(v) {
            self.packer.int(i);
            return true;
        }
        if let Some(i) = Integer::from_value(v) {
            return match i.to_i64() {
                Ok(i) => {
                    self.packer.int(i);
                    true
                }
                Err(_) => false,
            };
        }
        if let Some(f) = Float::from_value(v) {
            let f = f.to_f64();
            if f.is_finite() {
                self.packer.float(f);
            }
            return f.is_finite();
        }
        if RString::from_value(v).is_some() || Symbol::from_value(v).is_some() {
            return self.text(v);
        }
        if depth >= MAX_DEPTH {
            return false;
        }
        if let Some(h) = RHash::from_value(v) {
            self.hash(h, depth + 1, false);
            return true;
        }
        if let Some(a) = RArray::from_value(v) {
            self.array(a, depth + 1);
            return true;
        }
        false
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
        if flag.is_nil() {
            return Err(errors::argument(ruby, "flag must be a String (got nil)"));
        }
        let full_data = full_data.as_raw() == ruby.qtrue().as_raw();
        let context = if context.is_nil() {
            None
        } else {
            Some(
                RHash::from_value(context)
                    .ok_or_else(|| errors::argument(ruby, "context must be a Hash or nil"))?,
            )
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
        // One buffer for every text and the context (see `flags::packed`),
        // in its fixed order.
        let mut p = Packer::new();
        put_text(ruby, &mut p, flag, "flag")?;
        put_text(ruby, &mut p, variant, "variant")?;
        put_text(ruby, &mut p, allocation, "allocation")?;
        match Integer::from_value(targeting_key) {
            Some(i) => p.text(&i.to_string()),
            None => put_text(ruby, &mut p, targeting_key, "targeting_key")?,
        }
        put_text(ruby, &mut p, error_code, "error_code")?;
        put_text(ruby, &mut p, error_message, "error_message")?;
        match context {
            // Without consent no context is kept: not even walked.
            Some(h) if full_data => {
                let mut capture = Capture {
                    ruby,
                    packer: &mut p,
                    budget: MAX_CAPTURED_NODES,
                    ancestors: [0; MAX_DEPTH + 1],
                    depth: 0,
                };
                capture.hash(h, 0, from_hook.to_bool());
            }
            _ => {
                let empty = p.begin_map();
                p.end(empty, 0);
            }
        }
        Ok(inner.record(p.finish(timestamp_ms, full_data)))
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
        let limit = errors::wait(ruby, timeout)?;
        let flushed = inner.flush();
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
