//! Ruby values to `exporter_core` spans: the only work done under the GVL.
//!
//! Every check a span needs happens here, while the values are read, so a
//! bad trace raises `Exporter::InvalidTraceError` naming trace, span and
//! field before anything is sent. Strings of any encoding become UTF-8:
//! UTF-8, US-ASCII and binary strings are taken as bytes (invalid sequences
//! scrubbed to U+FFFD), other encodings are transcoded first.
//!
//! This is what `Writer#write` costs the application, so it is lean: Hashes
//! are walked without an `rb_ensure` frame, span fields are matched by
//! their static Symbols, a frozen String shared by the spans of a trace is
//! copied once, and a trace's storage is allocated once, sized from the
//! last trace. No Ruby object is allocated but a transcoded copy of a
//! String in another encoding.

use exporter_core::span::{
    AttributeValue, Entries, SizeHint, Span, SpanEvent, SpanExtras, SpanLink, Str, Trace,
};
use magnus::encoding::Coderange;
use magnus::encoding::EncodingCapable;
use magnus::value::ReprValue;
use magnus::{Error, Float, Integer, RArray, RHash, RString, Ruby, Symbol, TryConvert, Value};

use crate::errors;
use magnus::rb_sys::{AsRawValue, FromRawValue};

/// A conversion problem, before it is placed (trace/span) and raised.
type Problem = String;

fn class_name(v: Value) -> String {
    // SAFETY: the name is copied before any Ruby code can run.
    unsafe { v.classname() }.into_owned()
}

fn expected(what: &str, v: Value) -> Problem {
    format!("must be {what} (got {})", class_name(v))
}

/// Passes the text of a Ruby String, as UTF-8, to `f`: borrowed from Ruby
/// when it already is valid UTF-8, else transcoded and/or scrubbed (invalid
/// sequences become U+FFFD). `f` runs before any Ruby code can, so the
/// borrow is sound. Also tells whether a Ruby object was allocated (a
/// transcoded copy), after which a GC may have run.
fn with_text_noting<R>(
    ruby: &Ruby,
    v: Value,
    f: impl FnOnce(&str) -> R,
) -> Result<(R, bool), Problem> {
    let s = RString::from_value(v).ok_or_else(|| expected("a String", v))?;
    // Fast path: 7-bit strings (the coderange is cached on the string after
    // its first scan; Ruby only gives it to ASCII-compatible encodings) are
    // valid UTF-8 as they are.
    let cr = match s.enc_coderange() {
        // Read from the string's flags; scan (and cache) only if unknown.
        Coderange::Unknown => s.enc_coderange_scan(),
        known => known,
    };
    if cr == Coderange::SevenBit {
        // SAFETY: used by `f` before any Ruby code runs; 7-bit is UTF-8.
        return Ok((
            f(unsafe { std::str::from_utf8_unchecked(s.as_slice()) }),
            false,
        ));
    }
    let idx = s.enc_get();
    let as_is = idx == ruby.utf8_encindex()
        || idx == ruby.ascii8bit_encindex()
        || idx == ruby.usascii_encindex();
    let s = if as_is {
        s
    } else {
        s.conv_enc(ruby.utf8_encoding())
            .map_err(|e| format!("cannot be transcoded to UTF-8: {e}"))?
    };
    // SAFETY: used by `f` before any Ruby code runs (`s` is on the stack,
    // so a transcoded copy stays alive).
    let bytes = unsafe { s.as_slice() };
    let r = match std::str::from_utf8(bytes) {
        Ok(valid) => f(valid),
        Err(_) => f(&String::from_utf8_lossy(bytes)),
    };
    Ok((r, !as_is))
}

fn with_text<R>(ruby: &Ruby, v: Value, f: impl FnOnce(&str) -> R) -> Result<R, Problem> {
    with_text_noting(ruby, v, f).map(|(r, _)| r)
}

/// Reads a Ruby String as an owned UTF-8 String (for rare fields).
pub fn string(ruby: &Ruby, v: Value) -> Result<String, Problem> {
    with_text(ruby, v, str::to_owned)
}

/// A trace being converted, and the frozen Strings already copied into it.
struct Builder {
    trace: Trace,
    seen: Seen,
}

impl Builder {
    fn new(spans: usize) -> Builder {
        Builder {
            trace: Trace {
                spans: Vec::with_capacity(spans),
                ..Trace::default()
            },
            seen: Seen::new(),
        }
    }
}

/// Frozen Strings already copied into the trace's text buffer, by object.
///
/// The spans of a trace repeat the same tag names, service, env, version
/// and operation names, which tracers keep in frozen literals and
/// constants: each is copied (and checked) once per trace, then referred
/// to. A frozen String's text cannot change; an entry is only trusted while
/// no Ruby object was allocated since it was made (a GC could free or move
/// the String and give its address to another), hence [`Seen::forget`]
/// after a transcoding. Open addressing over a few slots; when those are
/// taken the String is simply copied each time (nothing is evicted, so two
/// Strings never take turns evicting each other).
struct Seen([(rb_sys::VALUE, Str); Seen::SLOTS]);

impl Seen {
    const SLOTS: usize = 128;
    const PROBES: usize = 4;
    /// Marks a free slot: `Qundef` is never a value Ruby code can pass
    /// (unlike `false`, `nil` or any other), so it is never found.
    const FREE: rb_sys::VALUE = rb_sys::Qundef as rb_sys::VALUE;

    fn new() -> Seen {
        Seen([(Seen::FREE, Str::default()); Seen::SLOTS])
    }

    #[inline(always)]
    fn slots(v: rb_sys::VALUE) -> impl Iterator<Item = usize> {
        // Fibonacci hashing of the object's address: its top 7 bits.
        let first = ((v >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 57) as usize;
        (first..first + Seen::PROBES).map(|i| i % Seen::SLOTS)
    }

    #[inline(always)]
    fn get(&self, v: rb_sys::VALUE) -> Option<Str> {
        for i in Seen::slots(v) {
            let (k, s) = self.0[i];
            if k == v {
                return Some(s);
            }
            if k == Seen::FREE {
                return None;
            }
        }
        None
    }

    fn put(&mut self, v: rb_sys::VALUE, s: Str) {
        for i in Seen::slots(v) {
            if self.0[i].0 == Seen::FREE {
                self.0[i] = (v, s);
                return;
            }
        }
    }

    fn forget(&mut self) {
        *self = Seen::new();
    }
}

/// Copies a Ruby String into the trace's text buffer (once per trace for a
/// frozen String).
#[inline]
fn text(ruby: &Ruby, b: &mut Builder, v: Value) -> Result<Str, Problem> {
    seen_or(ruby, b, v, copy_text)
}

/// The text of `v` if this trace has seen it, else what `copy` makes of it.
#[inline(always)]
fn seen_or(
    ruby: &Ruby,
    b: &mut Builder,
    v: Value,
    copy: fn(&Ruby, &mut Builder, Value) -> Result<Str, Problem>,
) -> Result<Str, Problem> {
    match b.seen.get(v.as_raw()) {
        Some(s) => Ok(s),
        None => copy(ruby, b, v),
    }
}

#[inline(never)]
fn copy_text(ruby: &Ruby, b: &mut Builder, v: Value) -> Result<Str, Problem> {
    let (s, allocated) = with_text_noting(ruby, v, |s| b.trace.push_str(s))?;
    if allocated {
        b.seen.forget();
    } else if v.is_frozen() {
        b.seen.put(v.as_raw(), s);
    }
    Ok(s)
}

/// A nil-or-String field, into the text buffer: nil is the empty string.
fn opt_text(ruby: &Ruby, b: &mut Builder, v: Value) -> Result<Str, Problem> {
    if v.is_nil() {
        Ok(Str::default())
    } else {
        text(ruby, b, v)
    }
}

/// A Hash key (String or Symbol), into the text buffer. String keys are
/// frozen (Hash freezes them), so those repeated by the spans are seen.
#[inline]
fn key_text(ruby: &Ruby, b: &mut Builder, k: Value) -> Result<Str, Problem> {
    seen_or(ruby, b, k, copy_key_text)
}

#[inline(never)]
fn copy_key_text(ruby: &Ruby, b: &mut Builder, k: Value) -> Result<Str, Problem> {
    if let Some(sym) = Symbol::from_value(k) {
        let name = sym.name().map_err(|e| e.to_string())?;
        return Ok(b.trace.push_str(&name));
    }
    copy_text(ruby, b, k)
        .map_err(|_| format!("has a key that {}", expected("a String or Symbol", k)))
}

/// Reads a meta (String => String) or metrics (String => number) Hash into
/// the trace's shared entries; returns the span's range of them.
fn entries<T>(
    ruby: &Ruby,
    b: &mut Builder,
    v: Value,
    value: impl Fn(&Ruby, &mut Builder, Value) -> Result<T, Problem>,
    list: impl Fn(&mut Trace) -> &mut Vec<(Str, T)> + Copy,
) -> Result<Entries, Problem> {
    let start = list(&mut b.trace).len();
    let range = |b: &mut Builder| Entries {
        start: start as u32,
        end: list(&mut b.trace).len() as u32,
    };
    if v.is_nil() {
        return Ok(range(b));
    }
    let h = hash(v)?;
    let len = h.len();
    let mut problem = None;
    each_pair(h, |k, v| {
        let k = match key_text(ruby, b, k) {
            Ok(k) => k,
            Err(p) => {
                problem = Some(p);
                return false;
            }
        };
        match value(ruby, b, v) {
            Ok(v) => {
                list(&mut b.trace).push((k, v));
                true
            }
            Err(p) => {
                problem = Some(format!("[{:?}] {p}", b.trace.str(k)));
                false
            }
        }
    });
    let read = range(b);
    match problem {
        Some(p) => Err(p),
        None if read.len() != len => Err("could not be read".into()),
        None => Ok(read),
    }
}

/// A nil-or-String field: nil is the empty string.
fn opt_string(ruby: &Ruby, v: Value) -> Result<String, Problem> {
    if v.is_nil() {
        Ok(String::new())
    } else {
        string(ruby, v)
    }
}

/// A Hash key: String or Symbol.
fn key(ruby: &Ruby, k: Value) -> Result<String, Problem> {
    if let Some(sym) = Symbol::from_value(k) {
        return sym
            .name()
            .map(|n| n.into_owned())
            .map_err(|e| e.to_string());
    }
    string(ruby, k).map_err(|_| format!("has a key that {}", expected("a String or Symbol", k)))
}

fn integer(v: Value) -> Result<Integer, Problem> {
    Integer::from_value(v).ok_or_else(|| expected("an Integer", v))
}

/// A Fixnum's value, read from the VALUE itself (most ids, timestamps and
/// durations are Fixnums: tagged with the low bit on 64-bit CRuby).
#[inline(always)]
fn fixnum(v: Value) -> Option<i64> {
    let raw = v.as_raw();
    (raw & 1 == 1).then_some((raw as i64) >> 1)
}

fn id64(v: Value) -> Result<u64, Problem> {
    match fixnum(v) {
        Some(i) if i >= 0 => Ok(i as u64),
        _ => integer(v)?
            .to_u64()
            .map_err(|_| "is out of range for an unsigned 64-bit id".into()),
    }
}

fn id128(v: Value) -> Result<u128, Problem> {
    match fixnum(v) {
        Some(i) if i >= 0 => Ok(i as u128),
        _ => integer(v)?
            .to_u128()
            .map_err(|_| "is out of range for an unsigned 128-bit id".into()),
    }
}

fn i64_field(v: Value) -> Result<i64, Problem> {
    match fixnum(v) {
        Some(i) => Ok(i),
        None => integer(v)?
            .to_i64()
            .map_err(|_| "is out of range for a signed 64-bit integer".into()),
    }
}

fn number(v: Value) -> Result<f64, Problem> {
    if let Some(f) = Float::from_value(v) {
        return Ok(f.to_f64());
    }
    if let Some(i) = Integer::from_value(v) {
        return Ok(i
            .to_i64()
            .map(|i| i as f64)
            .unwrap_or_else(|_| f64::try_convert(i.as_value()).unwrap_or(f64::NAN)));
    }
    Err(expected("an Integer or Float", v))
}

fn hash(v: Value) -> Result<RHash, Problem> {
    RHash::from_value(v).ok_or_else(|| expected("a Hash", v))
}

fn array(v: Value) -> Result<RArray, Problem> {
    RArray::from_value(v).ok_or_else(|| expected("an Array", v))
}

/// A C Hash iterator: `rb_hash_foreach`'s shape (an iterator that returns
/// an int can be called through it: the result register is ignored).
type ForeachFn = unsafe extern "C" fn(
    rb_sys::VALUE,
    Option<unsafe extern "C" fn(rb_sys::VALUE, rb_sys::VALUE, rb_sys::VALUE) -> std::ffi::c_int>,
    rb_sys::VALUE,
);

/// How Hashes are iterated, chosen once at load (see [`init`]).
///
/// `rb_hash_stlike_foreach` walks the table directly; `rb_hash_foreach`
/// wraps the same walk in an `rb_ensure` frame (setjmp) to undo its
/// iteration lock should the callback raise or modify the Hash. Ours does
/// neither (it only reads, runs no Ruby code and never raises), and that
/// frame was a tenth of `Writer#write`'s cost, so the direct walk is used
/// when this Ruby exports it (2.7 through 3.4 do; it is not public API,
/// hence looked up, with `rb_hash_foreach` as the fallback).
static FOREACH: std::sync::OnceLock<ForeachFn> = std::sync::OnceLock::new();

fn foreach_fn() -> ForeachFn {
    *FOREACH.get_or_init(|| {
        // SAFETY: dlsym with a NUL-terminated name; the symbol, when
        // present, is libruby's `int rb_hash_stlike_foreach(VALUE,
        // st_foreach_callback_func *, st_data_t)`, whose C signature is
        // `ForeachFn`'s (VALUE and st_data_t are both uintptr_t).
        let direct = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"rb_hash_stlike_foreach".as_ptr()) };
        if direct.is_null() {
            rb_sys::rb_hash_foreach as ForeachFn
        } else {
            // SAFETY: see above.
            unsafe { std::mem::transmute::<*mut libc::c_void, ForeachFn>(direct) }
        }
    })
}

/// How Hashes are iterated, for the specs: `:direct` or `:public`.
pub fn hash_iteration(ruby: &Ruby) -> Symbol {
    let public = rb_sys::rb_hash_foreach as ForeachFn;
    ruby.to_symbol(if foreach_fn() as usize == public as usize {
        "public"
    } else {
        "direct"
    })
}

/// Iterates a Hash without `rb_protect`: the callback must not raise nor
/// run Ruby code (it only reads values, and every magnus call that could
/// raise is protected by magnus itself). `f` returns false to stop.
fn each_pair<F: FnMut(Value, Value) -> bool>(h: RHash, mut f: F) {
    unsafe extern "C" fn call<F: FnMut(Value, Value) -> bool>(
        k: rb_sys::VALUE,
        v: rb_sys::VALUE,
        arg: rb_sys::VALUE,
    ) -> std::ffi::c_int {
        // SAFETY: `arg` is the `F` borrowed by `each_pair` for the whole
        // iteration; `k` and `v` are live entries of the hash.
        let (f, k, v) = unsafe {
            (
                &mut *(arg as *mut F),
                Value::from_raw(k),
                Value::from_raw(v),
            )
        };
        // A panic must not unwind into Ruby: stop iterating instead (the
        // caller then sees an incomplete result and reports it).
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(k, v))) {
            Ok(true) => rb_sys::st_retval::ST_CONTINUE as std::ffi::c_int,
            _ => rb_sys::st_retval::ST_STOP as std::ffi::c_int,
        }
    }
    // SAFETY: the callback upholds the iterator's contract (it neither
    // modifies the Hash nor raises nor runs Ruby code, so no other code can
    // modify it meanwhile); `f` outlives the call.
    unsafe {
        foreach_fn()(
            h.as_raw(),
            Some(call::<F>),
            &mut f as *mut F as rb_sys::VALUE,
        )
    };
}

/// Iterates a Hash, converting each value with `f`; problems name the key.
fn pairs<T>(
    ruby: &Ruby,
    h: RHash,
    mut f: impl FnMut(&Ruby, Value) -> Result<T, Problem>,
) -> Result<Vec<(String, T)>, Problem> {
    let len = h.len();
    let mut out = Vec::with_capacity(len);
    let mut problem = None;
    each_pair(h, |k, v| {
        let k = match key(ruby, k) {
            Ok(k) => k,
            Err(p) => {
                problem = Some(p);
                return false;
            }
        };
        match f(ruby, v) {
            Ok(v) => {
                out.push((k, v));
                true
            }
            Err(p) => {
                problem = Some(format!("[{k:?}] {p}"));
                false
            }
        }
    });
    match problem {
        Some(p) => Err(p),
        None if out.len() != len => Err("could not be read".into()),
        None => Ok(out),
    }
}

/// Encodes a Ruby value as msgpack (for `meta_struct`).
fn msgpack(ruby: &Ruby, v: Value) -> Result<rmpv::Value, Problem> {
    use rmpv::Value as M;
    if v.is_nil() {
        return Ok(M::Nil);
    }
    if v.as_raw() == ruby.qtrue().as_value().as_raw() {
        return Ok(M::Boolean(true));
    }
    if v.as_raw() == ruby.qfalse().as_value().as_raw() {
        return Ok(M::Boolean(false));
    }
    if let Some(i) = Integer::from_value(v) {
        if let Ok(i) = i.to_i64() {
            return Ok(M::from(i));
        }
        return i
            .to_u64()
            .map(M::from)
            .map_err(|_| "holds an Integer out of 64-bit range".into());
    }
    if let Some(f) = Float::from_value(v) {
        return Ok(M::F64(f.to_f64()));
    }
    if RString::from_value(v).is_some() {
        return string(ruby, v).map(M::from);
    }
    if let Some(s) = Symbol::from_value(v) {
        return s
            .name()
            .map(|n| M::from(n.into_owned()))
            .map_err(|e| e.to_string());
    }
    if let Some(a) = RArray::from_value(v) {
        let mut items = Vec::with_capacity(a.len());
        for item in a.into_iter() {
            items.push(msgpack(ruby, item)?);
        }
        return Ok(M::Array(items));
    }
    if let Some(h) = RHash::from_value(v) {
        let entries = pairs(ruby, h, msgpack)?;
        return Ok(M::Map(
            entries.into_iter().map(|(k, v)| (M::from(k), v)).collect(),
        ));
    }
    Err(format!(
        "holds a {} that msgpack cannot encode",
        class_name(v)
    ))
}

fn meta_struct_value(ruby: &Ruby, v: Value) -> Result<Vec<u8>, Problem> {
    let h = hash(v)?;
    let value = msgpack(ruby, h.as_value())?;
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &value).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// A span event (or exposure subject) attribute value.
pub fn attribute(ruby: &Ruby, v: Value) -> Result<AttributeValue, Problem> {
    if v.as_raw() == ruby.qtrue().as_value().as_raw() {
        return Ok(AttributeValue::Bool(true));
    }
    if v.as_raw() == ruby.qfalse().as_value().as_raw() {
        return Ok(AttributeValue::Bool(false));
    }
    if let Some(i) = Integer::from_value(v) {
        return i
            .to_i64()
            .map(AttributeValue::Int)
            .map_err(|_| "is out of 64-bit range".into());
    }
    if let Some(f) = Float::from_value(v) {
        return Ok(AttributeValue::Float(f.to_f64()));
    }
    if let Some(a) = RArray::from_value(v) {
        let mut items = Vec::with_capacity(a.len());
        for item in a.into_iter() {
            if RArray::from_value(item).is_some() {
                return Err("nests an Array in an Array".into());
            }
            items.push(attribute(ruby, item)?);
        }
        return Ok(AttributeValue::Array(items));
    }
    string(ruby, v).map(AttributeValue::String).map_err(|_| {
        expected(
            "a String, Integer, Float, true, false or an Array of those",
            v,
        )
    })
}

/// The keys a span, link or event Hash may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    TraceId,
    SpanId,
    ParentId,
    Name,
    Service,
    Resource,
    Type,
    Start,
    Duration,
    Error,
    Meta,
    Metrics,
    MetaStruct,
    SpanLinks,
    SpanEvents,
    Attributes,
    Tracestate,
    Flags,
    TimeUnixNano,
}

const FIELDS: [(&str, Field); 19] = [
    ("trace_id", Field::TraceId),
    ("span_id", Field::SpanId),
    ("parent_id", Field::ParentId),
    ("name", Field::Name),
    ("service", Field::Service),
    ("resource", Field::Resource),
    ("type", Field::Type),
    ("start", Field::Start),
    ("duration", Field::Duration),
    ("error", Field::Error),
    ("meta", Field::Meta),
    ("metrics", Field::Metrics),
    ("meta_struct", Field::MetaStruct),
    ("span_links", Field::SpanLinks),
    ("span_events", Field::SpanEvents),
    ("attributes", Field::Attributes),
    ("tracestate", Field::Tracestate),
    ("flags", Field::Flags),
    ("time_unix_nano", Field::TimeUnixNano),
];

impl Field {
    fn name(self) -> &'static str {
        FIELDS
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("?", |(n, _)| n)
    }
}

/// The static Symbol of every field name: a Symbol key is matched by
/// comparing VALUEs (static symbols are immediates that never move).
static FIELD_SYMBOLS: std::sync::OnceLock<Vec<(rb_sys::VALUE, Field)>> = std::sync::OnceLock::new();

/// Interns the field symbols; called once at load.
pub fn init(ruby: &Ruby) {
    foreach_fn();
    FIELD_SYMBOLS.get_or_init(|| {
        FIELDS
            .iter()
            .map(|(name, f)| (ruby.sym_new(*name).as_value().as_raw(), *f))
            .collect()
    });
}

/// The field a Symbol key names, by the Symbol's VALUE.
///
/// `hint` is where the previous key matched: spans built by one tracer list
/// their keys in the same order, so the next key is tried first, then all.
#[inline(always)]
fn field_symbol(syms: &[(rb_sys::VALUE, Field)], k: Value, hint: &mut usize) -> Option<Field> {
    let raw = k.as_raw();
    if let Some(&(sym, f)) = syms.get(*hint) {
        if sym == raw {
            *hint += 1;
            return Some(f);
        }
    }
    let i = syms.iter().position(|&(sym, _)| sym == raw)?;
    *hint = i + 1;
    Some(syms[i].1)
}

/// The field a key names (`None`: unknown key, ignored), or a problem:
/// [`field_symbol`], else a String key or another Symbol.
#[cold]
fn field_other(k: Value) -> Result<Option<Field>, Problem> {
    if Symbol::from_value(k).is_some() {
        return Ok(None);
    }
    let s = RString::from_value(k)
        .ok_or_else(|| format!("has a key that {}", expected("a String or Symbol", k)))?;
    // SAFETY: compared before any Ruby code can run.
    let bytes = unsafe { s.as_slice() };
    Ok(FIELDS
        .iter()
        .find(|(n, _)| n.as_bytes() == bytes)
        .map(|(_, f)| *f))
}

/// Reads a Hash-shaped record (span, link, event) field by field.
fn fields(
    h: RHash,
    mut f: impl FnMut(Field, Value) -> Result<(), (String, Problem)>,
) -> Result<(), (String, Problem)> {
    let mut problem = None;
    let mut hint = 0;
    let syms = FIELD_SYMBOLS.get().map_or(&[][..], Vec::as_slice);
    each_pair(h, |k, v| {
        let name = match field_symbol(syms, k, &mut hint) {
            Some(name) => Ok(Some(name)),
            None => field_other(k),
        };
        let result = match name {
            Ok(Some(name)) => f(name, v),
            Ok(None) => Ok(()),
            Err(p) => Err(("key".to_owned(), p)),
        };
        match result {
            Ok(()) => true,
            Err(p) => {
                problem = Some(p);
                false
            }
        }
    });
    problem.map_or(Ok(()), Err)
}

fn at<T>(field: Field, r: Result<T, Problem>) -> Result<T, (String, Problem)> {
    r.map_err(|p| (field.name().to_owned(), p))
}

fn span_link(ruby: &Ruby, v: Value) -> Result<SpanLink, Problem> {
    let h = hash(v)?;
    let mut link = SpanLink::default();
    let (mut has_trace, mut has_span) = (false, false);
    fields(h, |name, v| {
        match name {
            Field::TraceId => {
                link.trace_id = at(name, id128(v))?;
                has_trace = true;
            }
            Field::SpanId => {
                link.span_id = at(name, id64(v))?;
                has_span = true;
            }
            Field::Attributes => {
                link.attributes = at(name, hash(v).and_then(|h| pairs(ruby, h, string)))?
            }
            Field::Tracestate => link.tracestate = at(name, opt_string(ruby, v))?,
            Field::Flags => {
                link.flags = at(
                    name,
                    integer(v)
                        .and_then(|i| i.to_u32().map_err(|_| "is out of range for u32".into())),
                )?
            }
            _ => {}
        }
        Ok(())
    })
    .map_err(|(f, p)| format!("{f} {p}"))?;
    if !has_trace || !has_span {
        return Err("needs trace_id and span_id".into());
    }
    Ok(link)
}

fn span_event(ruby: &Ruby, v: Value) -> Result<SpanEvent, Problem> {
    let h = hash(v)?;
    let mut event = SpanEvent::default();
    let (mut has_name, mut has_time) = (false, false);
    fields(h, |name, v| {
        match name {
            Field::Name => {
                event.name = at(name, string(ruby, v))?;
                has_name = true;
            }
            Field::TimeUnixNano => {
                event.time_unix_nano = at(
                    name,
                    integer(v)
                        .and_then(|i| i.to_u64().map_err(|_| "is out of range for u64".into())),
                )?;
                has_time = true;
            }
            Field::Attributes => {
                event.attributes = at(name, hash(v).and_then(|h| pairs(ruby, h, attribute)))?
            }
            _ => {}
        }
        Ok(())
    })
    .map_err(|(f, p)| format!("{f} {p}"))?;
    if !has_name || !has_time {
        return Err("needs name and time_unix_nano".into());
    }
    Ok(event)
}

fn list<T>(
    ruby: &Ruby,
    v: Value,
    f: fn(&Ruby, Value) -> Result<T, Problem>,
) -> Result<Vec<T>, Problem> {
    if v.is_nil() {
        return Ok(Vec::new());
    }
    let a = array(v)?;
    let mut out = Vec::with_capacity(a.len());
    for (i, item) in a.into_iter().enumerate() {
        out.push(f(ruby, item).map_err(|p| format!("[{i}] {p}"))?);
    }
    Ok(out)
}

fn opt_pairs<T>(
    ruby: &Ruby,
    v: Value,
    f: impl FnMut(&Ruby, Value) -> Result<T, Problem>,
) -> Result<Vec<(String, T)>, Problem> {
    if v.is_nil() {
        return Ok(Vec::new());
    }
    pairs(ruby, hash(v)?, f)
}

fn error_flag(ruby: &Ruby, v: Value) -> Result<i32, Problem> {
    if v.is_nil() || v.as_raw() == ruby.qfalse().as_value().as_raw() {
        return Ok(0);
    }
    if v.as_raw() == ruby.qtrue().as_value().as_raw() {
        return Ok(1);
    }
    integer(v)?
        .to_i32()
        .map_err(|_| "is out of range for a 32-bit integer".into())
}

/// Converts one span Hash into `t`.
fn span(ruby: &Ruby, b: &mut Builder, v: Value) -> Result<(), (String, Problem)> {
    let h = hash(v).map_err(|p| ("span".to_owned(), p))?;
    let mut s = Span::default();
    let mut rare: Option<SpanExtras> = None;
    let (mut has_trace, mut has_span, mut has_name) = (false, false, false);
    fields(h, |name, v| {
        match name {
            Field::TraceId => {
                s.trace_id = at(name, id128(v))?;
                has_trace = true;
            }
            Field::SpanId => {
                s.span_id = at(name, id64(v))?;
                has_span = true;
            }
            Field::ParentId if !v.is_nil() => s.parent_id = at(name, id64(v))?,
            Field::Name => {
                s.name = at(name, text(ruby, b, v))?;
                has_name = true;
            }
            Field::Service => s.service = at(name, opt_text(ruby, b, v))?,
            Field::Resource => s.resource = at(name, opt_text(ruby, b, v))?,
            Field::Type => s.r#type = at(name, opt_text(ruby, b, v))?,
            Field::Start if !v.is_nil() => s.start = at(name, i64_field(v))?,
            Field::Duration if !v.is_nil() => {
                s.duration = at(name, i64_field(v))?;
                if s.duration < 0 {
                    return Err((name.name().into(), "must not be negative".into()));
                }
            }
            Field::Error => s.error = at(name, error_flag(ruby, v))?,
            Field::Meta => s.meta = at(name, entries(ruby, b, v, text, |t| &mut t.meta))?,
            Field::Metrics => {
                s.metrics = at(
                    name,
                    entries(ruby, b, v, |_, _, v| number(v), |t| &mut t.metrics),
                )?
            }
            Field::MetaStruct => {
                rare.get_or_insert_with(SpanExtras::default).meta_struct =
                    at(name, opt_pairs(ruby, v, meta_struct_value))?
            }
            Field::SpanLinks => {
                rare.get_or_insert_with(SpanExtras::default).span_links =
                    at(name, list(ruby, v, span_link))?
            }
            Field::SpanEvents => {
                rare.get_or_insert_with(SpanExtras::default).span_events =
                    at(name, list(ruby, v, span_event))?
            }
            _ => {}
        }
        Ok(())
    })?;
    if !(has_trace && has_span && has_name) {
        let field = match (has_trace, has_span) {
            (false, _) => "trace_id",
            (_, false) => "span_id",
            _ => "name",
        };
        return Err((field.into(), "is missing".into()));
    }
    if let Some(rare) = rare {
        s.extras = b.trace.push_extras(rare);
    }
    b.trace.spans.push(s);
    Ok(())
}

/// What the last trace converted needed (see [`SizeHint`]).
static SIZES: SizeHint = SizeHint::new();

/// Converts one trace (an Array of span Hashes); `ti` names it in errors.
pub fn trace(ruby: &Ruby, v: Value, ti: usize) -> Result<Trace, Error> {
    let a = RArray::from_value(v).ok_or_else(|| {
        errors::invalid_trace(
            ruby,
            format!("trace {ti}: {}", expected("an Array of span Hashes", v)),
        )
    })?;
    let n = a.len();
    let mut b = Builder::new(n);
    SIZES.reserve(&mut b.trace, n);
    // By index: `RArray::into_iter` would allocate a hidden copy per trace
    // (no Ruby code runs meanwhile, so the Array cannot change).
    for si in 0..n {
        // SAFETY: the Array's storage is read afresh for each span (a GC
        // during the previous one may have moved it) and no Ruby code runs
        // meanwhile, so it cannot shrink.
        let sv = unsafe { a.as_slice()[si] };
        span(ruby, &mut b, sv).map_err(|(field, p)| {
            errors::invalid_trace(ruby, format!("trace {ti}, span {si}: {field} {p}"))
        })?;
    }
    SIZES.learn(&b.trace);
    Ok(b.trace)
}

/// Converts an Array of traces.
pub fn traces(ruby: &Ruby, v: Value) -> Result<Vec<Trace>, Error> {
    let a = RArray::from_value(v).ok_or_else(|| {
        errors::invalid_trace(
            ruby,
            format!("traces {}", expected("an Array of traces", v)),
        )
    })?;
    let mut out = Vec::with_capacity(a.len());
    for ti in 0..a.len() {
        out.push(trace(ruby, a.entry(ti as isize)?, ti)?);
    }
    Ok(out)
}
