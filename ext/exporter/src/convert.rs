//! Ruby values to `exporter_core` spans: the only work done under the GVL.
//!
//! Every check a span needs happens here, while the values are read, so a
//! bad trace raises `Exporter::InvalidTraceError` naming trace, span and
//! field before anything is sent. Strings of any encoding become UTF-8:
//! UTF-8, US-ASCII and binary strings are taken as bytes (invalid sequences
//! scrubbed to U+FFFD), other encodings are transcoded first.

use exporter_core::span::{
    AttributeValue, Entries, Span, SpanEvent, SpanExtras, SpanLink, Str, Trace,
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
/// borrow is sound.
fn with_text<R>(ruby: &Ruby, v: Value, f: impl FnOnce(&str) -> R) -> Result<R, Problem> {
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
        return Ok(f(unsafe { std::str::from_utf8_unchecked(s.as_slice()) }));
    }
    let idx = s.enc_get();
    let s = if idx == ruby.utf8_encindex()
        || idx == ruby.ascii8bit_encindex()
        || idx == ruby.usascii_encindex()
    {
        s
    } else {
        s.conv_enc(ruby.utf8_encoding())
            .map_err(|e| format!("cannot be transcoded to UTF-8: {e}"))?
    };
    // SAFETY: used by `f` before any Ruby code runs (`s` is on the stack,
    // so a transcoded copy stays alive).
    let bytes = unsafe { s.as_slice() };
    Ok(match std::str::from_utf8(bytes) {
        Ok(valid) => f(valid),
        Err(_) => f(&String::from_utf8_lossy(bytes)),
    })
}

/// Reads a Ruby String as an owned UTF-8 String (for rare fields).
pub fn string(ruby: &Ruby, v: Value) -> Result<String, Problem> {
    with_text(ruby, v, str::to_owned)
}

/// Copies a Ruby String into the trace's text buffer.
fn text(ruby: &Ruby, t: &mut Trace, v: Value) -> Result<Str, Problem> {
    with_text(ruby, v, |s| t.push_str(s))
}

/// A nil-or-String field, into the text buffer: nil is the empty string.
fn opt_text(ruby: &Ruby, t: &mut Trace, v: Value) -> Result<Str, Problem> {
    if v.is_nil() {
        Ok(Str::default())
    } else {
        text(ruby, t, v)
    }
}

/// A Hash key (String or Symbol), into the text buffer.
fn key_text(ruby: &Ruby, t: &mut Trace, k: Value) -> Result<Str, Problem> {
    if let Some(sym) = Symbol::from_value(k) {
        let name = sym.name().map_err(|e| e.to_string())?;
        return Ok(t.push_str(&name));
    }
    text(ruby, t, k).map_err(|_| format!("has a key that {}", expected("a String or Symbol", k)))
}

/// Reads a meta (String => String) or metrics (String => number) Hash into
/// the trace's shared entries; returns the span's range of them.
fn entries<T>(
    ruby: &Ruby,
    t: &mut Trace,
    v: Value,
    value: impl Fn(&Ruby, &mut Trace, Value) -> Result<T, Problem>,
    push: impl Fn(&mut Trace, Str, T),
    mark: impl Fn(&Trace) -> u32,
) -> Result<(u32, u32), Problem> {
    let start = mark(t);
    if v.is_nil() {
        return Ok((start, start));
    }
    let h = hash(v)?;
    let len = h.len();
    let mut problem = None;
    each_pair(h, |k, v| {
        let k = match key_text(ruby, t, k) {
            Ok(k) => k,
            Err(p) => {
                problem = Some(p);
                return false;
            }
        };
        match value(ruby, t, v) {
            Ok(v) => {
                push(t, k, v);
                true
            }
            Err(p) => {
                problem = Some(format!("[{:?}] {p}", t.str(k)));
                false
            }
        }
    });
    let end = mark(t);
    match problem {
        Some(p) => Err(p),
        None if (end - start) as usize != len => Err("could not be read".into()),
        None => Ok((start, end)),
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

fn id64(v: Value) -> Result<u64, Problem> {
    integer(v)?
        .to_u64()
        .map_err(|_| "is out of range for an unsigned 64-bit id".into())
}

fn id128(v: Value) -> Result<u128, Problem> {
    integer(v)?
        .to_u128()
        .map_err(|_| "is out of range for an unsigned 128-bit id".into())
}

fn i64_field(v: Value) -> Result<i64, Problem> {
    integer(v)?
        .to_i64()
        .map_err(|_| "is out of range for a signed 64-bit integer".into())
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

/// Iterates a Hash without `rb_protect` (the callback must not raise: it
/// only reads values, and every magnus call that could raise is protected
/// by magnus itself). `f` returns false to stop.
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
    // SAFETY: the callback upholds rb_hash_foreach's contract and never
    // raises; `f` outlives the call.
    unsafe {
        rb_sys::rb_hash_foreach(
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
    FIELD_SYMBOLS.get_or_init(|| {
        FIELDS
            .iter()
            .map(|(name, f)| (ruby.sym_new(*name).as_value().as_raw(), *f))
            .collect()
    });
}

/// The field a key names (`None`: unknown key, ignored), or a problem.
///
/// `hint` is where the previous key matched: spans built by one tracer list
/// their keys in the same order, so the next key is tried first, then all.
fn field(k: Value, hint: &mut usize) -> Result<Option<Field>, Problem> {
    if let Some(syms) = FIELD_SYMBOLS.get() {
        let raw = k.as_raw();
        let n = syms.len();
        for i in (*hint..n).chain(0..*hint) {
            if syms[i].0 == raw {
                *hint = (i + 1) % n;
                return Ok(Some(syms[i].1));
            }
        }
    }
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
    each_pair(h, |k, v| {
        let result = match field(k, &mut hint) {
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
fn span(ruby: &Ruby, t: &mut Trace, v: Value) -> Result<(), (String, Problem)> {
    let h = hash(v).map_err(|p| ("span".to_owned(), p))?;
    let mut s = Span::default();
    let mut rare = SpanExtras::default();
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
                s.name = at(name, text(ruby, t, v))?;
                has_name = true;
            }
            Field::Service => s.service = at(name, opt_text(ruby, t, v))?,
            Field::Resource => s.resource = at(name, opt_text(ruby, t, v))?,
            Field::Type => s.r#type = at(name, opt_text(ruby, t, v))?,
            Field::Start if !v.is_nil() => s.start = at(name, i64_field(v))?,
            Field::Duration if !v.is_nil() => {
                s.duration = at(name, i64_field(v))?;
                if s.duration < 0 {
                    return Err((name.name().into(), "must not be negative".into()));
                }
            }
            Field::Error => s.error = at(name, error_flag(ruby, v))?,
            Field::Meta => {
                let (start, end) = at(
                    name,
                    entries(
                        ruby,
                        t,
                        v,
                        text,
                        |t, k, v| t.meta.push((k, v)),
                        Trace::meta_mark,
                    ),
                )?;
                s.meta = Entries { start, end };
            }
            Field::Metrics => {
                let (start, end) = at(
                    name,
                    entries(
                        ruby,
                        t,
                        v,
                        |_, _, v| number(v),
                        |t, k, v| t.metrics.push((k, v)),
                        Trace::metrics_mark,
                    ),
                )?;
                s.metrics = Entries { start, end };
            }
            Field::MetaStruct => {
                rare.meta_struct = at(name, opt_pairs(ruby, v, meta_struct_value))?
            }
            Field::SpanLinks => rare.span_links = at(name, list(ruby, v, span_link))?,
            Field::SpanEvents => rare.span_events = at(name, list(ruby, v, span_event))?,
            _ => {}
        }
        Ok(())
    })?;
    for (present, field) in [
        (has_trace, "trace_id"),
        (has_span, "span_id"),
        (has_name, "name"),
    ] {
        if !present {
            return Err((field.into(), "is missing".into()));
        }
    }
    s.extras = t.push_extras(rare);
    t.spans.push(s);
    Ok(())
}

/// Converts one trace (an Array of span Hashes); `ti` names it in errors.
pub fn trace(ruby: &Ruby, v: Value, ti: usize) -> Result<Trace, Error> {
    let a = RArray::from_value(v).ok_or_else(|| {
        errors::invalid_trace(
            ruby,
            format!("trace {ti}: {}", expected("an Array of span Hashes", v)),
        )
    })?;
    let n = a.len();
    let mut t = Trace {
        spans: Vec::with_capacity(n),
        ..Trace::default()
    };
    for (si, sv) in a.into_iter().enumerate() {
        span(ruby, &mut t, sv).map_err(|(field, p)| {
            errors::invalid_trace(ruby, format!("trace {ti}, span {si}: {field} {p}"))
        })?;
        if si == 0 && n > 1 {
            // Spans of a trace look alike: size the shared storage from the
            // first one (plus a quarter), instead of growing it repeatedly.
            let more = n - 1;
            t.text.reserve(t.text.len() * more * 5 / 4);
            t.meta.reserve(t.meta.len() * more * 5 / 4);
            t.metrics.reserve(t.metrics.len() * more * 5 / 4);
        }
    }
    Ok(t)
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
    for (ti, tv) in a.into_iter().enumerate() {
        out.push(trace(ruby, tv, ti)?);
    }
    Ok(out)
}
