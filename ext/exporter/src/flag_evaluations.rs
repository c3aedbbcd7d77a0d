//! `Exporter::FlagEvaluations`, native half: `_record` captures its
//! arguments under the GVL (Strings copied, the context walked with a depth
//! bound, cycles cut, a node budget; no Ruby code is ever called) and
//! queues an `Evaluation`; `_record_hook` and `_record_sdk` do the same for
//! the OpenFeature hook, reading the flag metadata and the context's fields
//! itself (and, from `_record_sdk`, the SDK's evaluation details).
//! Aggregation, keying, privacy and HTTP run in `exporter_core::flags` on
//! the shared runtime. With the killswitch on
//! there is no worker at all: `_record` returns false.

use std::cell::Cell;
use std::sync::Arc;

use exporter_core::exposures::Context;
use exporter_core::flags::context::{MAX_CAPTURED_NODES, MAX_CHARS, MAX_DEPTH};
use exporter_core::flags::packed::Packer;
use exporter_core::flags::worker::{now_ms, Config, EvaluationWorker};
use exporter_core::worker;
use magnus::rb_sys::AsRawValue;
use magnus::value::{Lazy, LazyId, ReprValue};
use magnus::{
    function, method, prelude::*, Error, Float, Integer, RArray, RHash, RModule, RString, Ruby,
    Symbol, Value,
};

use crate::exposures::Exposures;
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

/// The key of the targeting key in an evaluation context's fields (the
/// OpenFeature hook leaves it out of the context it keeps).
const TARGETING_KEY: &str = "targeting_key";

/// An optional String (or Symbol) argument, packed; the error names it.
fn put_text(ruby: &Ruby, p: &mut Packer, v: Value, name: &str) -> Result<(), Error> {
    if v.is_nil() {
        p.none();
        return Ok(());
    }
    if let Some(text) = convert::ascii_text(v) {
        p.text(text);
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
        if let Some(s) = convert::ascii_text(v) {
            // 7-bit: as many characters as bytes.
            let kept = s.len() <= MAX_CHARS;
            if kept {
                self.packer.text(s);
            }
            return kept;
        }
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
        if convert::ascii_text(v).is_some() {
            return self.text(v);
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

/// One evaluation's arguments, as Ruby values: what `_record` was given,
/// or what `_record_hook` read from the OpenFeature SDK's objects. Checked
/// and packed by [`capture`], the one place for both.
struct Args {
    flag: Value,
    variant: Value,
    allocation: Value,
    targeting_key: Value,
    context: Value,
    error_code: Value,
    error_message: Value,
    timestamp_ms: Value,
    full_data: bool,
    /// Read by the hook: a bad timestamp from a provider's metadata is
    /// replaced by now, and the context's `targeting_key` is left out.
    from_hook: bool,
}

/// Checks one evaluation's arguments and packs them into its one buffer
/// (see `flags::packed`), then queues it: true when queued.
fn capture(ruby: &Ruby, inner: &EvaluationWorker, a: &Args) -> Result<bool, Error> {
    if a.flag.is_nil() {
        return Err(errors::argument(ruby, "flag must be a String (got nil)"));
    }
    let context = if a.context.is_nil() {
        None
    } else {
        Some(
            RHash::from_value(a.context)
                .ok_or_else(|| errors::argument(ruby, "context must be a Hash or nil"))?,
        )
    };
    let timestamp_ms = if a.timestamp_ms.is_nil() {
        now_ms()
    } else {
        let ms = Integer::from_value(a.timestamp_ms)
            .and_then(|i| i.to_i64().ok())
            .filter(|ms| TIMESTAMP_RANGE.contains(ms));
        match ms {
            Some(ms) => ms,
            // Metadata from a provider: not the application's mistake.
            None if a.from_hook => now_ms(),
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
    let mut p = Packer::with_buffer(SCRATCH.take());
    put_text(ruby, &mut p, a.flag, "flag")?;
    put_text(ruby, &mut p, a.variant, "variant")?;
    put_text(ruby, &mut p, a.allocation, "allocation")?;
    match Integer::from_value(a.targeting_key) {
        Some(i) => p.text(&i.to_string()),
        None => put_text(ruby, &mut p, a.targeting_key, "targeting_key")?,
    }
    put_text(ruby, &mut p, a.error_code, "error_code")?;
    put_text(ruby, &mut p, a.error_message, "error_message")?;
    match context {
        // Without consent no context is kept: not even walked.
        Some(h) if a.full_data => {
            let mut capture = Capture {
                ruby,
                packer: &mut p,
                budget: MAX_CAPTURED_NODES,
                ancestors: [0; MAX_DEPTH + 1],
                depth: 0,
            };
            capture.hash(h, 0, a.from_hook);
        }
        _ => {
            let empty = p.begin_map();
            p.end(empty, 0);
        }
    }
    let queued = inner.record(p.packed(timestamp_ms, a.full_data));
    let mut buf = p.into_buffer();
    buf.shrink_to(SCRATCH_BYTES);
    SCRATCH.set(buf);
    Ok(queued)
}

thread_local! {
    /// The calling thread's packing buffer, reused from one `record` to
    /// the next (the queue copies what was packed): taken, not borrowed,
    /// so an error or a Ruby exception in between only loses it.
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// A packing buffer grown larger than this (a large context) is shrunk
/// back before it is kept.
const SCRATCH_BYTES: usize = 16 << 10;

/// The `flag_metadata` keys the OpenFeature hook reads, each with its
/// alternative name: allocation, evaluation time, consent.
const ALLOCATION_KEY: usize = 0;
const TIMESTAMP_KEY: usize = 2;
const CONSENT_KEY: usize = 4;
const METADATA_KEYS: [&str; 5] = [
    "__dd_allocation_key",
    "allocationKey",
    "__dd_eval_timestamp_ms",
    "dd.eval.timestamp_ms",
    "observe_full_evaluation_data",
];
/// Up to this many entries, `flag_metadata` and the context's fields are
/// read in one pass comparing keys ([`string_keys`]): cheaper than hashing
/// each key looked up (and no `rb_protect` frame).
const SMALL_HASH: usize = 8;

/// The values of the String keys `keys` in `h`, in one pass comparing
/// bytes, as `h[key]` finds them for these ASCII keys (without a default;
/// in a `compare_by_identity` Hash too, where `[]` would want the very
/// object); None where absent. Only reads: no Ruby code runs (see
/// `each_pair`).
fn string_keys<const N: usize>(h: RHash, keys: [&str; N]) -> [Option<Value>; N] {
    let mut found = [None; N];
    convert::each_pair(h, |k, v| {
        let i = convert::string_bytes(k).and_then(|k| keys.iter().position(|m| m.as_bytes() == k));
        if let Some(i) = i {
            found[i] = Some(v);
        }
        true
    });
    found
}

static AREF: LazyId = LazyId::new("[]");
static TARGETING_KEY_STRING: Lazy<RString> = Lazy::new(|ruby| {
    let s = ruby.str_new(TARGETING_KEY);
    s.freeze();
    s
});

/// Members of the SDK's `EvaluationDetails` (`flag_key`,
/// `resolution_details`) and of its `Provider::ResolutionDetails`
/// (`value`, `reason`, `variant`, `error_code`, `error_message`,
/// `flag_metadata`), as `Hook::SDK_CLASSES` checks them.
const SDK_DETAILS_MEMBERS: usize = 2;
const SDK_RESOLUTION_MEMBERS: usize = 6;

/// The flag key, variant, error code and message, and the metadata of
/// `details` when it is a Struct of `details_class` (the SDK's
/// EvaluationDetails) holding one of `resolution_class` (its
/// ResolutionDetails), read member by member; None otherwise. Calls no
/// Ruby code.
fn sdk_details(
    details: Value,
    details_class: Value,
    resolution_class: Value,
) -> Option<([Value; 4], Value)> {
    if !convert::is_struct_of(details, details_class, SDK_DETAILS_MEMBERS) {
        return None;
    }
    // SAFETY: `details` is a Struct of `SDK_DETAILS_MEMBERS` members:
    // flag_key, resolution_details.
    let [flag, resolution] = [0, 1].map(|i| unsafe { convert::struct_member(details, i) });
    if !convert::is_struct_of(resolution, resolution_class, SDK_RESOLUTION_MEMBERS) {
        return None;
    }
    // SAFETY: `resolution` is a Struct of `SDK_RESOLUTION_MEMBERS`
    // members: value, reason, variant, error_code, error_message,
    // flag_metadata.
    let [variant, error_code, error_message, meta] =
        [2, 3, 4, 5].map(|i| unsafe { convert::struct_member(resolution, i) });
    Some(([flag, variant, error_code, error_message], meta))
}

/// What `OpenFeature::Hook#finally` records, from the SDK's objects: the
/// flag key, variant, error code and message, `flag_metadata` (a Hash,
/// anything answering `[]`, or nil) and the evaluation context's `fields`
/// (likewise). The SDK's own evaluation details are read member by member
/// ([`FlagEvaluations::record_sdk`]); anything else through its readers,
/// called by the hook in Ruby (where inline caches make each call a
/// fraction of a `rb_funcall` from here). The metadata and the fields are
/// read here, without calling Ruby code when they are Hashes.
struct Hook {
    args: Args,
    fields: Value,
}

impl Hook {
    fn read(ruby: &Ruby, details: [Value; 4], meta: Value, fields: Value) -> Result<Hook, Error> {
        let [flag, variant, error_code, error_message] = details;
        let nil = ruby.qnil().as_value();
        let meta = Self::metadata(ruby, meta)?;
        // `meta[key] || meta[alternative]`
        let either = |key: usize| match meta[key] {
            Some(v) if v.to_bool() => v,
            _ => meta[key + 1].unwrap_or(nil),
        };
        let full_data = meta[CONSENT_KEY].is_some_and(|v| v.as_raw() == ruby.qtrue().as_raw());
        let targeting_key = if fields.is_nil() {
            nil
        } else {
            let key = ruby.get_inner(&TARGETING_KEY_STRING);
            match RHash::from_value(fields) {
                Some(h) if h.len() <= SMALL_HASH => {
                    let [v] = string_keys(h, [TARGETING_KEY]);
                    v.unwrap_or(nil)
                }
                Some(h) => h.get(key).unwrap_or(nil),
                None => fields.funcall(LazyId::get_inner_with(&AREF, ruby), (key,))?,
            }
        };
        Ok(Hook {
            args: Args {
                flag,
                variant,
                allocation: either(ALLOCATION_KEY),
                targeting_key,
                // The context is only read with consent: not handed over otherwise.
                context: if full_data { fields } else { nil },
                error_code,
                error_message,
                timestamp_ms: either(TIMESTAMP_KEY),
                full_data,
                from_hook: true,
            },
            fields,
        })
    }

    /// The value of each of `METADATA_KEYS` in `flag_metadata` (None:
    /// absent, or no metadata).
    fn metadata(ruby: &Ruby, meta: Value) -> Result<[Option<Value>; 5], Error> {
        let mut found = [None; METADATA_KEYS.len()];
        if meta.is_nil() {
            return Ok(found);
        }
        match RHash::from_value(meta) {
            Some(h) if h.len() <= SMALL_HASH => found = string_keys(h, METADATA_KEYS),
            Some(h) => {
                for (slot, key) in found.iter_mut().zip(METADATA_KEYS) {
                    *slot = h.get(ruby.str_new(key));
                }
            }
            None => {
                for (slot, key) in found.iter_mut().zip(METADATA_KEYS) {
                    let v: Value = meta.funcall(LazyId::get_inner_with(&AREF, ruby), (key,))?;
                    *slot = (!v.is_nil()).then_some(v);
                }
            }
        }
        Ok(found)
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
    fn record(ruby: &Ruby, rb_self: Value, args: &[Value]) -> Result<bool, Error> {
        let Some(inner) = &convert::receiver::<Self>(rb_self)?.inner else {
            return Ok(false);
        };
        let &[flag, variant, allocation, targeting_key, context, error_code, error_message, timestamp_ms, full_data, from_hook] =
            args
        else {
            return Err(errors::argument(ruby, "_record takes 10 arguments"));
        };
        let args = Args {
            flag,
            variant,
            allocation,
            targeting_key,
            context,
            error_code,
            error_message,
            timestamp_ms,
            full_data: full_data.as_raw() == ruby.qtrue().as_raw(),
            from_hook: from_hook.to_bool(),
        };
        capture(ruby, inner, &args)
    }

    /// `_record_hook(metadata, fields, flag, variant, error_code,
    /// error_message, exposures)`: what `OpenFeature::Hook#finally`
    /// records (see [`Hook`] and [`FlagEvaluations::record_read`]), from
    /// what it read through the readers of the SDK's objects.
    fn record_hook(ruby: &Ruby, rb_self: Value, args: &[Value]) -> Result<(), Error> {
        let rb_self = convert::receiver::<Self>(rb_self)?;
        let &[meta, fields, flag, variant, error_code, error_message, exposures] = args else {
            return Err(errors::argument(ruby, "_record_hook takes 7 arguments"));
        };
        let details = [flag, variant, error_code, error_message];
        rb_self.record_read(ruby, details, meta, fields, exposures)
    }

    /// `_record_sdk(details, details_class, resolution_class, fields,
    /// exposures)`: as `_record_hook`, reading `details` here when it is
    /// an instance of `details_class`, the SDK's own
    /// `OpenFeature::SDK::EvaluationDetails`, and its
    /// `resolution_details` one of `resolution_class`, the SDK's
    /// `Provider::ResolutionDetails` (the hook checked both classes: their
    /// names and members). Their members are read where they are: the
    /// SDK's readers return them (its EvaluationDetails delegates to
    /// `resolution_details` through Forwardable, ~150 ns a call; since
    /// 0.6.5 `flag_metadata` gives `{}` for nil and a frozen copy of a
    /// Hash that is not frozen: the same keys and values). Returns false,
    /// recording nothing, for any other object: the hook then reads it
    /// through its readers; nil when recorded.
    fn record_sdk(ruby: &Ruby, rb_self: Value, args: &[Value]) -> Result<Value, Error> {
        let rb_self = convert::receiver::<Self>(rb_self)?;
        let &[details, details_class, resolution_class, fields, exposures] = args else {
            return Err(errors::argument(ruby, "_record_sdk takes 5 arguments"));
        };
        let Some((details, meta)) = sdk_details(details, details_class, resolution_class) else {
            return Ok(ruby.qfalse().as_value());
        };
        rb_self.record_read(ruby, details, meta, fields, exposures)?;
        Ok(ruby.qnil().as_value())
    }

    /// Records what the hook read (see [`Hook`]), and, when `exposures`
    /// (an `Exporter::Exposures`) is given and the evaluation has an
    /// allocation, a variant and a targeting key, an exposure: the
    /// context's fields are the subject's attributes, the targeting key
    /// left out. A duplicate exposure (the common case) reads no field.
    fn record_read(
        &self,
        ruby: &Ruby,
        details: [Value; 4],
        meta: Value,
        fields: Value,
        exposures: Value,
    ) -> Result<(), Error> {
        let expose = exposures.to_bool();
        if self.inner.is_none() && !expose {
            return Ok(());
        }
        let hook = Hook::read(ruby, details, meta, fields)?;
        if let Some(inner) = &self.inner {
            capture(ruby, inner, &hook.args)?;
        }
        let a = &hook.args;
        if expose && a.allocation.to_bool() && a.variant.to_bool() && a.targeting_key.to_bool() {
            Exposures::record_from_hook(
                ruby,
                exposures,
                [a.flag, a.allocation, a.variant, a.targeting_key],
                hook.fields,
                TARGETING_KEY,
            )?;
        }
        Ok(())
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
    class.define_method("_record_hook", method!(FlagEvaluations::record_hook, -1))?;
    class.define_method("_record_sdk", method!(FlagEvaluations::record_sdk, -1))?;
    class.define_method("_hook_failed", method!(FlagEvaluations::hook_failed, 1))?;
    class.define_method("_flush", method!(FlagEvaluations::flush, 1))?;
    class.define_method("_stop", method!(FlagEvaluations::stop_worker, 0))?;
    class.define_method("enabled?", method!(FlagEvaluations::enabled, 0))?;
    class.define_method("stats", method!(FlagEvaluations::stats, 0))?;
    Ok(())
}
