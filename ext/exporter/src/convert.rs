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
    TRACE_POOL,
};
use magnus::encoding::Coderange;
use magnus::encoding::EncodingCapable;
use magnus::typed_data::TypedData;
use magnus::value::ReprValue;
use magnus::{
    DataType, Error, Float, Integer, RArray, RHash, RString, Ruby, Symbol, TryConvert, Value,
};

mod prefetch;

use crate::errors;
use magnus::rb_sys::{AsRawValue, FromRawValue};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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
    if let Some(text) = ascii_text(v) {
        return Ok((f(text), false));
    }
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

/// Whether a VALUE is an object's address: not an immediate (Fixnum,
/// flonum, static Symbol, true, undef), nil or false.
#[inline(always)]
pub(crate) fn is_object(raw: rb_sys::VALUE) -> bool {
    raw & rb_sys::special_consts::IMMEDIATE_MASK as rb_sys::VALUE == 0
        && raw & !(rb_sys::Qnil as rb_sys::VALUE) != 0
}

/// A String's bytes in place, as this Ruby lays them out (rb-sys).
///
/// # Safety
/// `raw` is a live String; the slice is used before any Ruby code can run
/// (which could change or move the bytes).
#[inline(always)]
unsafe fn string_slice<'a>(raw: rb_sys::VALUE) -> &'a [u8] {
    std::slice::from_raw_parts(
        rb_sys::RSTRING_PTR(raw) as *const u8,
        rb_sys::RSTRING_LEN(raw) as usize,
    )
}

/// The bytes of `v` if it is a String (7-bit ones read in place, see
/// [`ascii_text`]); valid until Ruby code runs. For comparing keys with
/// ASCII texts, as `==` finds them.
#[inline]
pub(crate) fn string_bytes<'a>(v: Value) -> Option<&'a [u8]> {
    match ascii_text(v) {
        Some(text) => Some(text.as_bytes()),
        // SAFETY: a String, read by the caller before any Ruby code runs.
        None => RString::from_value(v).map(|s| unsafe { string_slice(s.as_raw()) }),
    }
}

/// Whether `v` is a String equal to the ASCII text `want`.
#[inline]
pub(crate) fn is_string(v: Value, want: &str) -> bool {
    string_bytes(v) == Some(want.as_bytes())
}

/// Whether `v` is a Struct of exactly `class` (not a subclass, nor an
/// object with a singleton class) holding at least `members` values: the
/// precondition of [`struct_member`]. Calls no Ruby code.
#[inline]
pub(crate) fn is_struct_of(v: Value, class: Value, members: usize) -> bool {
    let raw = v.as_raw();
    if !is_object(raw) {
        return false;
    }
    // SAFETY: `v` is a live object: flags and class are its first words.
    let (flags, klass) = unsafe {
        let basic = &*(raw as *const rb_sys::RBasic);
        (basic.flags, basic.klass)
    };
    let is_struct = flags & rb_sys::ruby_value_type::RUBY_T_MASK as rb_sys::VALUE
        == rb_sys::ruby_value_type::RUBY_T_STRUCT as rb_sys::VALUE;
    // SAFETY: `v` is a Struct; `rb_struct_size` reads its length (a
    // Fixnum) and raises nothing.
    is_struct
        && klass == class.as_raw()
        && unsafe { rb_sys::rb_struct_size(raw) } >> 1 >= members as rb_sys::VALUE
}

/// Member `i` of a Struct, read in place (`RSTRUCT_GET`).
///
/// # Safety
/// `is_struct_of(v, _, n)` with `n > i`: `rb_struct_aref` would raise
/// (and unwind through Rust) for an index out of range.
#[inline]
pub(crate) unsafe fn struct_member(v: Value, i: usize) -> Value {
    Value::from_raw(rb_sys::rb_struct_aref(
        v.as_raw(),
        ((i as rb_sys::VALUE) << 1) | 1,
    ))
}

/// The text of `v` if it is a String known to be 7-bit (its coderange,
/// cached in its flags once scanned): valid UTF-8 as it is, whatever its
/// (ASCII-compatible) encoding. `None` for anything else, which the caller
/// reads the general way.
///
/// Almost every text a tracer or a flag provider passes is such a String,
/// and reading one is the commonest thing conversion does: this reads the
/// flags once and the bytes in place, inline, where the general path
/// spends ~100 instructions in calls and repeated type checks.
#[inline(always)]
pub(crate) fn ascii_text<'a>(v: Value) -> Option<&'a str> {
    let raw = v.as_raw();
    if !is_object(raw) {
        return None;
    }
    // SAFETY: `v` is a live object: its flags are its first word.
    let flags = unsafe { (*(raw as *const rb_sys::RBasic)).flags };
    let string = flags & rb_sys::ruby_value_type::RUBY_T_MASK as rb_sys::VALUE
        == rb_sys::ruby_value_type::RUBY_T_STRING as rb_sys::VALUE;
    let seven_bit = flags & rb_sys::ruby_coderange_type::RUBY_ENC_CODERANGE_MASK as rb_sys::VALUE
        == rb_sys::ruby_coderange_type::RUBY_ENC_CODERANGE_7BIT as rb_sys::VALUE;
    if !(string && seven_bit) {
        return None;
    }
    // SAFETY: a String, used by the caller before any Ruby code can run;
    // 7-bit bytes are UTF-8.
    unsafe { Some(std::str::from_utf8_unchecked(string_slice(raw))) }
}

pub(crate) fn with_text<R>(ruby: &Ruby, v: Value, f: impl FnOnce(&str) -> R) -> Result<R, Problem> {
    with_text_noting(ruby, v, f).map(|(r, _)| r)
}

/// Reads a Ruby String as an owned UTF-8 String (for rare fields).
pub fn string(ruby: &Ruby, v: Value) -> Result<String, Problem> {
    with_text(ruby, v, str::to_owned)
}

/// A trace being converted, the frozen Strings already copied into it, and
/// the last Bignum trace and parent ids read.
struct Builder {
    trace: Trace,
    seen: Seen,
    trace_id: LastId,
    parent_id: LastId,
}

impl Builder {
    fn new(spans: usize) -> Builder {
        // Storage of a trace already sent, still in cache (see `TracePool`).
        let mut trace = TRACE_POOL.take().unwrap_or_default();
        trace.spans.reserve(spans);
        Builder {
            trace,
            seen: Seen::new(),
            trace_id: LastId::NONE,
            parent_id: LastId::NONE,
        }
    }

    /// Forgets every object remembered by address: called once a Ruby
    /// object may have been allocated (a GC may then have freed or moved
    /// what they point to).
    fn forget(&mut self) {
        self.seen.forget();
        self.trace_id = LastId::NONE;
        self.parent_id = LastId::NONE;
    }

    /// A span's trace_id (its low 64 bits not 0). The spans of a trace share one Integer
    /// object (a Bignum for a 128-bit id): read once per trace.
    #[inline(always)]
    fn trace_id(&mut self, v: Value) -> Result<u128, Problem> {
        if let Some(id) = self.trace_id.get(v) {
            return Ok(id);
        }
        let id = id128(v)?;
        if id as u64 == 0 {
            // The agent reads the low 64 bits: 0 there is a dropped span.
            return Err(if id == 0 {
                "must not be 0".into()
            } else {
                "must not have its low 64 bits all 0".into()
            });
        }
        self.trace_id.put(v, id);
        Ok(id)
    }

    /// A span's parent_id: most spans of a trace have the root's or their
    /// parent's span id object, read once while it repeats.
    #[inline(always)]
    fn parent_id(&mut self, v: Value) -> Result<u64, Problem> {
        if let Some(id) = self.parent_id.get(v) {
            return Ok(id as u64);
        }
        let id = id64(v)?;
        self.parent_id.put(v, u128::from(id));
        Ok(id)
    }
}

/// The last Bignum id read for a field, by object. A Bignum's value cannot
/// change; the entry is trusted only while no Ruby object was allocated
/// (see [`Builder::forget`]). Fixnums are not kept (they are read from the
/// VALUE, which is as cheap as the lookup).
#[derive(Clone, Copy)]
struct LastId(rb_sys::VALUE, u128);

impl LastId {
    const NONE: LastId = LastId(Seen::FREE, 0);

    #[inline(always)]
    fn get(self, v: Value) -> Option<u128> {
        (self.0 == v.as_raw()).then_some(self.1)
    }

    #[inline(always)]
    fn put(&mut self, v: Value, id: u128) {
        if fixnum(v).is_none() {
            *self = LastId(v.as_raw(), id);
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
        self.0.fill((Seen::FREE, Str::default()));
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
        b.forget();
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
        // A Symbol's name never allocates: kept like a frozen String.
        let s = symbol_text(ruby, sym, |s| b.trace.push_str(s))?;
        b.seen.put(k.as_raw(), s);
        return Ok(s);
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
    each_pair(
        h,
        #[inline(always)]
        |k, v| {
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
        },
    );
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

/// Passes a Symbol's name, as UTF-8 (scrubbed like a String), to `f`.
fn symbol_text<R>(ruby: &Ruby, s: Symbol, f: impl FnOnce(&str) -> R) -> Result<R, Problem> {
    // SAFETY: `rb_sym2str` returns the Symbol's own frozen name (no
    // allocation, no Ruby code, cannot raise for a Symbol).
    let name = unsafe { Value::from_raw(rb_sys::rb_sym2str(s.as_raw())) };
    with_text(ruby, name, f)
}

/// Passes a Hash key (String or Symbol), as UTF-8, to `f`.
pub(crate) fn key_with<R>(ruby: &Ruby, k: Value, f: impl FnOnce(&str) -> R) -> Result<R, Problem> {
    if let Some(text) = ascii_text(k) {
        return Ok(f(text));
    }
    if let Some(sym) = Symbol::from_value(k) {
        return symbol_text(ruby, sym, f);
    }
    if RString::from_value(k).is_none() {
        return Err(format!(
            "has a key that {}",
            expected("a String or Symbol", k)
        ));
    }
    with_text(ruby, k, f)
}

/// A Hash key: String or Symbol.
pub fn key(ruby: &Ruby, k: Value) -> Result<String, Problem> {
    key_with(ruby, k, str::to_owned)
}

fn integer(v: Value) -> Result<Integer, Problem> {
    Integer::from_value(v).ok_or_else(|| expected("an Integer", v))
}

/// A Fixnum's value, read from the VALUE itself (most ids, timestamps and
/// durations are Fixnums: tagged with the low bit on 64-bit CRuby).
#[inline(always)]
pub(crate) fn fixnum(v: Value) -> Option<i64> {
    let raw = v.as_raw();
    (raw & 1 == 1).then_some((raw as i64) >> 1)
}

/// Why an Integer is not a valid unsigned id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BadId {
    NotInteger,
    Negative,
    TooWide,
}

/// The value of a non-negative Integer of at most `words` 64-bit words
/// (1 or 2), read without calling Ruby code and without an `rb_protect`
/// frame: a Fixnum from the VALUE, a Bignum's magnitude straight from its
/// digits by `rb_integer_pack`, whose return value gives the sign and
/// whether it fits before the words are used.
#[inline(always)]
fn unsigned(v: Value, words: usize) -> Result<u128, BadId> {
    if let Some(i) = fixnum(v) {
        return if i >= 0 {
            Ok(i as u128)
        } else {
            Err(BadId::Negative)
        };
    }
    if magnus::RBignum::from_value(v).is_none() {
        return Err(BadId::NotInteger);
    }
    let words = words.min(2);
    match digits(v, words, DIGIT_BYTES.load(Ordering::Relaxed)) {
        Some(id) => Ok(id),
        None => bignum(v, words),
    }
}

/// The width of a Bignum digit (`BDIGIT`) when this Ruby's Bignums were
/// found laid out as [`digits`] reads them (see [`init_bignum`]); 0: they
/// are read by `rb_integer_pack` only.
static DIGIT_BYTES: AtomicUsize = AtomicUsize::new(0);

/// A CRuby Bignum (`internal/bignum.h`, 2.x through 3.5): its flags word
/// tells the sign (`FL_USER1` set: positive) and whether the digits are
/// embedded (`FL_USER2`), then their number (from `FL_USHIFT + 3`: 3 bits
/// in older Rubies, 9 in newer ones; the 6 above the 3 are 0 in older
/// ones, whose Bignums use no other flags); embedded
/// digits follow `RBasic` (flags, klass), least significant first.
const BIGNUM_SIGN: u64 = rb_sys::ruby_fl_type::RUBY_FL_USER1 as u64;
const BIGNUM_EMBED: u64 = rb_sys::ruby_fl_type::RUBY_FL_USER2 as u64;
const BIGNUM_LEN_SHIFT: u32 = rb_sys::ruby_fl_ushift::RUBY_FL_USHIFT as u32 + 3;
const BIGNUM_LEN_MASK: u64 = 0x1ff;

/// The value of a positive Bignum with embedded digits that fits in
/// `words` (<= 2) 64-bit words, read from the object itself, with digits
/// of `digit` bytes (0: not at all); None to read it with
/// `rb_integer_pack` (negative, not embedded, wider, or a layout this
/// Ruby was not found to have).
#[inline(always)]
fn digits(v: Value, words: usize, digit: usize) -> Option<u128> {
    if digit == 0
        || cfg!(not(all(
            target_endian = "little",
            target_pointer_width = "64"
        )))
    {
        return None;
    }
    let p = v.as_raw() as *const u64;
    // SAFETY: `v` is a live T_BIGNUM (checked by the caller) and no Ruby
    // code runs meanwhile; every heap object's slot holds at least five
    // words (RBasic's two, then three), so words 0, 2 and 3 are inside it.
    // Word 2 is read only for 1 to 16 bytes of embedded digits, word 3
    // only for more than 8: those bytes are the number's own, in the
    // layout `init_bignum` found (for another layout `digit` is 0).
    let flags = unsafe { p.read() };
    if flags & (BIGNUM_SIGN | BIGNUM_EMBED) != BIGNUM_SIGN | BIGNUM_EMBED {
        return None;
    }
    let bytes = ((flags >> BIGNUM_LEN_SHIFT) & BIGNUM_LEN_MASK) as usize * digit;
    if bytes == 0 || bytes > words * 8 {
        return None;
    }
    // SAFETY: see above.
    let low = unsafe { p.add(2).read() };
    if bytes <= 8 {
        return Some(u128::from(low & (u64::MAX >> (64 - 8 * bytes))));
    }
    // SAFETY: see above.
    let high = unsafe { p.add(3).read() } & (u64::MAX >> (128 - 8 * bytes));
    Some(u128::from(low) | (u128::from(high) << 64))
}

/// Checks, once at load, that this Ruby's Bignums are laid out as
/// [`digits`] reads them, with 8- or 4-byte digits: every sample Bignum
/// (positive and negative, 1 to 4 words) must read as `rb_integer_pack`
/// reads it, and the positive ones that fit must be read. Otherwise ids
/// are read by `rb_integer_pack` only.
fn init_bignum() {
    const SAMPLES: [[u64; 4]; 9] = [
        [1 << 62, 0, 0, 0],
        [u64::MAX, 0, 0, 0],
        [0x8000_0000_0000_0001, 0, 0, 0],
        [0x0123_4567_89ab_cdef, 1, 0, 0],
        [0, 1, 0, 0],
        [0xfedc_ba98_7654_3210, 0x6543_0000_0000_0001, 0, 0],
        [u64::MAX, u64::MAX, 0, 0],
        [5, 0, 1, 0],
        [7, 0, 0, 1 << 40],
    ];
    let works = |digit: usize| {
        SAMPLES.iter().all(|words| {
            [false, true].iter().all(|&negative| {
                let flags = rb_sys::INTEGER_PACK_LSWORD_FIRST
                    | rb_sys::INTEGER_PACK_NATIVE_BYTE_ORDER
                    | if negative {
                        rb_sys::INTEGER_PACK_NEGATIVE
                    } else {
                        0
                    };
                // SAFETY: reads 4 words of 8 bytes from `words`; returns a
                // new Integer (a Bignum for every sample), kept on the
                // stack while it is read (no other allocation meanwhile).
                let v = unsafe {
                    Value::from_raw(rb_sys::rb_integer_unpack(
                        words.as_ptr().cast(),
                        4,
                        8,
                        0,
                        flags as i32,
                    ))
                };
                if magnus::RBignum::from_value(v).is_none() {
                    // -(2**62) is a Fixnum.
                    return fixnum(v).is_some();
                }
                let ok = (1..=2).all(|n| {
                    let packed = bignum(v, n);
                    match digits(v, n, digit) {
                        Some(id) => packed == Ok(id),
                        None => packed.is_err(),
                    }
                });
                std::hint::black_box(v);
                ok
            })
        })
    };
    if let Some(digit) = [8, 4].into_iter().find(|&d| works(d)) {
        DIGIT_BYTES.store(digit, Ordering::Relaxed);
    }
}

/// How Bignum ids are read, for the specs: `:direct` or `:packed`.
pub fn bignum_reading(ruby: &Ruby) -> Symbol {
    ruby.to_symbol(if DIGIT_BYTES.load(Ordering::Relaxed) == 0 {
        "packed"
    } else {
        "direct"
    })
}

#[inline(never)]
fn bignum(v: Value, words: usize) -> Result<u128, BadId> {
    let mut out = [0u64; 2];
    // SAFETY: `v` is a T_BIGNUM (checked by the caller), so
    // `rb_integer_pack` neither calls Ruby code (its `rb_to_int` returns
    // an Integer as is) nor raises; it writes at most `words` (<= 2, the
    // length of `out`) words of 8 bytes, least significant first, in
    // native byte order, and returns the sign and overflow: -2/-1
    // negative, 0 zero, 1 fits, 2 wider than `words` words.
    let sign = unsafe {
        rb_sys::rb_integer_pack(
            v.as_raw(),
            out.as_mut_ptr().cast(),
            words as _,
            8,
            0,
            (rb_sys::INTEGER_PACK_LSWORD_FIRST | rb_sys::INTEGER_PACK_NATIVE_BYTE_ORDER) as i32,
        )
    };
    match sign {
        0 | 1 => Ok(u128::from(out[0]) | (u128::from(out[1]) << 64)),
        2 => Err(BadId::TooWide),
        _ => Err(BadId::Negative),
    }
}

#[cold]
#[inline(never)]
fn id_problem(v: Value, bad: BadId, bits: u32) -> Problem {
    match bad {
        BadId::NotInteger => expected("an Integer", v),
        BadId::Negative | BadId::TooWide => {
            format!("is out of range for an unsigned {bits}-bit id")
        }
    }
}

/// A 64-bit id (parent_id, link span_id); 0 is allowed.
#[inline(always)]
fn id64(v: Value) -> Result<u64, Problem> {
    unsigned(v, 1)
        .map(|i| i as u64)
        .map_err(|bad| id_problem(v, bad, 64))
}

/// A 128-bit id (link trace_id); 0 is allowed.
fn id128(v: Value) -> Result<u128, Problem> {
    unsigned(v, 2).map_err(|bad| id_problem(v, bad, 128))
}

/// A span's own span_id or trace_id: as [`id64`]/[`id128`], and not 0
/// (the agent drops spans with a zero id).
fn nonzero<T: PartialEq + Default>(r: Result<T, Problem>) -> Result<T, Problem> {
    match r {
        Ok(i) if i == T::default() => Err("must not be 0".into()),
        r => r,
    }
}

#[inline(always)]
fn i64_field(v: Value) -> Result<i64, Problem> {
    match fixnum(v) {
        Some(i) => Ok(i),
        None => i64_other(v),
    }
}

#[cold]
#[inline(never)]
fn i64_other(v: Value) -> Result<i64, Problem> {
    integer(v)?
        .to_i64()
        .map_err(|_| "is out of range for a signed 64-bit integer".into())
}

/// A metric: a Float (most are flonums, read from the VALUE) or Integer.
#[inline(always)]
fn number(v: Value) -> Result<f64, Problem> {
    match magnus::value::Flonum::from_value(v) {
        Some(f) => Ok(f.to_f64()),
        None => number_other(v),
    }
}

#[inline(never)]
fn number_other(v: Value) -> Result<f64, Problem> {
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
/// (`:table` when [`walk`] reads the Hash's table itself).
pub fn hash_iteration(ruby: &Ruby) -> Symbol {
    let public = rb_sys::rb_hash_foreach as ForeachFn;
    ruby.to_symbol(if WALK.load(Ordering::Relaxed) {
        "table"
    } else if foreach_fn() as usize == public as usize {
        "public"
    } else {
        "direct"
    })
}

/// Whether Hashes are walked by [`walk`] (see [`init_walk`]).
static WALK: AtomicBool = AtomicBool::new(false);

/// A Hash of Ruby 3.1 and 3.2 (`internal/hash.h`): `RBasic` (flags,
/// klass), then a pointer to its table: with `FL_USER3` an `st_table`
/// (public, `ruby/st.h`) whose entries are {hash, key, value}, a deleted
/// one's hash all ones; else, possibly null, an array of 8 {key, value}
/// pairs (a deleted one's key `Qundef`), the first `bound` (flags bits
/// `FL_USHIFT + 8` to `+ 11`) in use. Later Rubies embed the table in the
/// object instead: they use `rb_hash_stlike_foreach`. Ruby 3.1 only: the
/// check at load follows the table pointer, so it cannot catch a layout it
/// was not written for without risking the process; 3.2 (likely the same
/// layout, not tested here) takes the C iterator too.
const LAYOUT_3_1: bool = rb_sys::RUBY_API_VERSION_MAJOR == 3 && rb_sys::RUBY_API_VERSION_MINOR == 1;
const HASH_ST: usize = rb_sys::ruby_fl_type::RUBY_FL_USER3 as usize;
const HASH_AR_BOUND_SHIFT: u32 = rb_sys::ruby_fl_ushift::RUBY_FL_USHIFT as u32 + 8;

/// Walks a Hash's table in order, as `rb_hash_stlike_foreach` does, but
/// inline, without a C call per entry. The table is found afresh for each
/// entry (a callback that allocates may run a GC, which can move an array
/// table out of the transient heap, or keys and values by compaction).
#[inline(always)]
fn walk(h: RHash, mut f: impl FnMut(Value, Value) -> bool) {
    let p = h.as_raw() as *const usize;
    // SAFETY (all reads below): `h` is a live Hash (on the stack, so not
    // moved) of the layout above (checked at load by `init_walk`), and no
    // Ruby code runs between a read and its use: its flags and table
    // pointer are its words 0 and 2; an array table holds 8 pairs, read
    // only below its bound (at most 8); an st_table's entries are read
    // from its entries_start to its entries_bound.
    if unsafe { p.read() } & HASH_ST == 0 {
        for i in 0..8 {
            let (k, v) = unsafe {
                let bound = (p.read() >> HASH_AR_BOUND_SHIFT) & 0xf;
                let table = p.add(2).read() as *const [usize; 2];
                if table.is_null() || i >= bound {
                    return;
                }
                let pair = table.add(i).read();
                (pair[0], pair[1])
            };
            if k != rb_sys::Qundef as usize && !f(from_raw(k), from_raw(v)) {
                return;
            }
        }
    } else {
        for i in 0.. {
            let (hash, k, v) = unsafe {
                let st = &*(p.add(2).read() as *const rb_sys::st_table);
                let at = st.entries_start as usize + i;
                if at >= st.entries_bound as usize {
                    return;
                }
                let [hash, k, v] = (st.entries as *const [usize; 3]).add(at).read();
                (hash, k, v)
            };
            if hash != usize::MAX && !f(from_raw(k), from_raw(v)) {
                return;
            }
        }
    }
}

/// An entry of a Hash [`walk`] read.
#[inline(always)]
fn from_raw(v: usize) -> Value {
    // SAFETY: a live key or value of the Hash being walked.
    unsafe { Value::from_raw(v as rb_sys::VALUE) }
}

/// Checks, once at load, that [`walk`] reads Hashes as
/// `rb_hash_stlike_foreach` does on this Ruby (array and st tables, with
/// deleted entries, compare_by_identity): else it is not used.
fn init_walk() {
    if !LAYOUT_3_1 || cfg!(not(target_pointer_width = "64")) {
        return;
    }
    let mut all_agree = true;
    for (n, deleted, identity) in [
        (0, 0, false),
        (1, 0, false),
        (5, 2, false),
        (8, 0, false),
        (8, 7, false),
        (9, 0, false),
        (12, 3, false),
        (40, 20, false),
        (3, 1, true),
    ] {
        // SAFETY: plain Hash API calls at load (no iteration running);
        // `h` is kept on the stack while it is read.
        let h = unsafe {
            let h = rb_sys::rb_hash_new();
            if identity {
                rb_sys::rb_funcallv(
                    h,
                    rb_sys::rb_intern(c"compare_by_identity".as_ptr()),
                    0,
                    std::ptr::null(),
                );
            }
            for i in 0..n {
                rb_sys::rb_hash_aset(h, rb_sys::rb_int2inum(i * 7 + 1), rb_sys::rb_int2inum(i));
            }
            for i in 0..deleted {
                rb_sys::rb_hash_delete(h, rb_sys::rb_int2inum((i * 3 % n.max(1)) * 7 + 1));
            }
            RHash::from_value(Value::from_raw(h))
        };
        let Some(h) = h else { return };
        let mut expected = Vec::new();
        each_pair_foreach(h, |k, v| {
            expected.push((k.as_raw(), v.as_raw()));
            true
        });
        let mut got = Vec::new();
        walk(h, |k, v| {
            got.push((k.as_raw(), v.as_raw()));
            true
        });
        all_agree &= got == expected && got.len() == h.len();
        std::hint::black_box(h);
    }
    WALK.store(all_agree, Ordering::Relaxed);
}

/// Iterates a Hash without `rb_protect`: the callback must not raise nor
/// run Ruby code (it only reads values, and every magnus call that could
/// raise is protected by magnus itself). `f` returns false to stop.
#[inline(always)]
pub fn each_pair<F: FnMut(Value, Value) -> bool>(h: RHash, f: F) {
    if WALK.load(Ordering::Relaxed) {
        walk(h, f)
    } else {
        each_pair_foreach(h, f)
    }
}

/// [`each_pair`] by the Hash iterator Ruby exports.
fn each_pair_foreach<F: FnMut(Value, Value) -> bool>(h: RHash, mut f: F) {
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

/// How deep `meta_struct` values may nest (Arrays and Hashes), as
/// `JSON.generate`'s default `max_nesting`.
pub const MAX_DEPTH: usize = 100;

/// The most a `meta_struct` value may take encoded: more than any agent
/// accepts in a whole request. Bounds the time and memory a value that
/// shares sub-structures (`a = [x, x]`, nested: each level doubles) takes.
pub const MAX_ENCODED: usize = 32 << 20;

/// Encodes one `meta_struct` value (a Hash) as msgpack.
///
/// The walk is bounded: at most [`MAX_DEPTH`] levels of Arrays and Hashes
/// (so the native recursion, a few hundred bytes of stack per level, can
/// never overflow), no container inside itself (a cycle is reported as
/// such), at most [`MAX_ENCODED`] bytes. Every container on the path is
/// kept in `path`, on the machine stack, where Ruby's GC sees (and pins)
/// it; elements are read afresh from their container at each step.
struct Msgpack<'r> {
    ruby: &'r Ruby,
    out: Vec<u8>,
    path: [rb_sys::VALUE; MAX_DEPTH],
    depth: usize,
}

impl Msgpack<'_> {
    fn value(&mut self, v: Value) -> Result<(), Problem> {
        use rmp::encode as w;
        if self.out.len() > MAX_ENCODED {
            return Err(format!("is over {} MiB encoded", MAX_ENCODED >> 20));
        }
        let ruby = self.ruby;
        let out = &mut self.out;
        // Writing into a Vec cannot fail.
        if v.is_nil() {
            w::write_nil(out).ok();
        } else if v.as_raw() == ruby.qtrue().as_value().as_raw() {
            w::write_bool(out, true).ok();
        } else if v.as_raw() == ruby.qfalse().as_value().as_raw() {
            w::write_bool(out, false).ok();
        } else if let Some(i) = fixnum(v) {
            w::write_sint(out, i).ok();
        } else if let Some(i) = Integer::from_value(v) {
            match (i.to_i64(), i.to_u64()) {
                (Ok(i), _) => w::write_sint(out, i).ok(),
                (_, Ok(u)) => w::write_uint(out, u).ok(),
                _ => return Err("holds an Integer out of 64-bit range".into()),
            };
        } else if let Some(f) = Float::from_value(v) {
            w::write_f64(out, f.to_f64()).ok();
        } else if RString::from_value(v).is_some() {
            with_text(ruby, v, |s| w::write_str(out, s).ok())?;
        } else if let Some(s) = Symbol::from_value(v) {
            symbol_text(ruby, s, |s| w::write_str(out, s).ok())?;
        } else if let Some(a) = RArray::from_value(v) {
            self.enter(v)?;
            w::write_array_len(&mut self.out, a.len() as u32).ok();
            let mut i = 0;
            // By index, re-reading the Array each time (a transcoded
            // String allocates: a GC may move its elements).
            while let Some(item) = array_item(a, i) {
                self.value(item).map_err(|p| format!("[{i}] {p}"))?;
                i += 1;
            }
            self.depth -= 1;
        } else if let Some(h) = RHash::from_value(v) {
            self.enter(v)?;
            let len = h.len();
            w::write_map_len(&mut self.out, len as u32).ok();
            let mut problem = None;
            let mut read = 0;
            each_pair(h, |k, v| {
                let r = key_with(ruby, k, |k| w::write_str(&mut self.out, k).ok()).and_then(|_| {
                    self.value(v).map_err(|p| match key(ruby, k) {
                        Ok(k) => format!("[{k:?}] {p}"),
                        Err(_) => p,
                    })
                });
                read += 1;
                r.map_err(|p| problem = Some(p)).is_ok()
            });
            if let Some(p) = problem {
                return Err(p);
            }
            if read != len {
                return Err("could not be read".into());
            }
            self.depth -= 1;
        } else {
            return Err(format!(
                "holds a {} that msgpack cannot encode",
                class_name(v)
            ));
        }
        Ok(())
    }

    /// Enters a container: refuses a cycle and nesting past the limit.
    fn enter(&mut self, v: Value) -> Result<(), Problem> {
        let raw = v.as_raw();
        if self.path[..self.depth].contains(&raw) {
            return Err(format!("is cyclic (a {} contains itself)", class_name(v)));
        }
        if self.depth == MAX_DEPTH {
            return Err(format!("nests deeper than {MAX_DEPTH} levels"));
        }
        self.path[self.depth] = raw;
        self.depth += 1;
        Ok(())
    }
}

/// Element `i` of an Array, read afresh (None past its end).
fn array_item(a: RArray, i: usize) -> Option<Value> {
    // SAFETY: the slice is read and dropped at once, before any Ruby code
    // can run.
    unsafe { a.as_slice().get(i).copied() }
}

fn meta_struct_value(ruby: &Ruby, v: Value) -> Result<Vec<u8>, Problem> {
    hash(v)?;
    let mut m = Msgpack {
        ruby,
        out: Vec::new(),
        path: [Seen::FREE; MAX_DEPTH],
        depth: 0,
    };
    m.value(v)?;
    // Keeps `path` alive (on the stack) until the walk is over.
    std::hint::black_box(&m.path);
    Ok(m.out)
}

/// A primitive attribute value as read: a String's text is left in Ruby,
/// for the caller to copy where it goes.
pub(crate) enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    String(RString),
}

/// Reads a primitive attribute value: String, Integer (64-bit), Float,
/// true, false.
pub(crate) fn scalar_of(ruby: &Ruby, v: Value) -> Result<Scalar, Problem> {
    if v.as_raw() == ruby.qtrue().as_value().as_raw() {
        return Ok(Scalar::Bool(true));
    }
    if v.as_raw() == ruby.qfalse().as_value().as_raw() {
        return Ok(Scalar::Bool(false));
    }
    if let Some(i) = fixnum(v) {
        return Ok(Scalar::Int(i));
    }
    if let Some(s) = RString::from_value(v) {
        return Ok(Scalar::String(s));
    }
    if let Some(i) = Integer::from_value(v) {
        return i
            .to_i64()
            .map(Scalar::Int)
            .map_err(|_| "is out of 64-bit range".into());
    }
    if let Some(f) = Float::from_value(v) {
        return Ok(Scalar::Float(f.to_f64()));
    }
    Err(not_scalar(v))
}

fn not_scalar(v: Value) -> Problem {
    expected(
        "a String, Integer, Float, true, false or an Array of those",
        v,
    )
}

/// A primitive attribute value (see [`scalar_of`]), copied.
fn scalar(ruby: &Ruby, v: Value) -> Result<AttributeValue, Problem> {
    Ok(match scalar_of(ruby, v)? {
        Scalar::Bool(b) => AttributeValue::Bool(b),
        Scalar::Int(i) => AttributeValue::Int(i),
        Scalar::Float(f) => AttributeValue::Float(f),
        Scalar::String(s) => {
            let s = s.as_value();
            AttributeValue::String(string(ruby, s).map_err(|_| not_scalar(s))?)
        }
    })
}

/// A span event attribute value: a [`scalar`] or a flat Array of them
/// (one level: an Array in an Array is refused, so nothing nests and
/// nothing recurses).
pub fn attribute(ruby: &Ruby, v: Value) -> Result<AttributeValue, Problem> {
    let Some(a) = RArray::from_value(v) else {
        return scalar(ruby, v);
    };
    let mut items = Vec::with_capacity(a.len());
    let mut i = 0;
    while let Some(item) = array_item(a, i) {
        if RArray::from_value(item).is_some() {
            return Err("nests an Array in an Array".into());
        }
        items.push(scalar(ruby, item).map_err(|p| format!("[{i}] {p}"))?);
        i += 1;
    }
    Ok(AttributeValue::Array(items))
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

/// The Rust value a method's receiver wraps, read from the object: its
/// data type is checked by address, without magnus's checked conversion
/// (an `rb_protect` frame around `rb_check_typeddata` on every call). Any
/// other object goes through that conversion (and gets its TypeError).
pub(crate) fn receiver<'a, T: TypedData>(v: Value) -> Result<&'a T, Error> {
    let raw = v.as_raw();
    let ours = T::data_type() as *const DataType as *const rb_sys::rb_data_type_t;
    // SAFETY: each check guards the next read: a T_DATA object, typed,
    // whose data type is T's (`DataType` is a transparent
    // `rb_data_type_t`); its data is then the `T` magnus boxed, alive as
    // long as the receiver, which is on the caller's stack.
    unsafe {
        if rb_sys::RB_TYPE_P(raw, rb_sys::ruby_value_type::RUBY_T_DATA)
            && rb_sys::RTYPEDDATA_P(raw)
            && std::ptr::eq(rb_sys::RTYPEDDATA_TYPE(raw), ours)
        {
            if let Some(t) = (rb_sys::RTYPEDDATA_GET_DATA(raw) as *const T).as_ref() {
                return Ok(t);
            }
        }
    }
    <&T>::try_convert(v)
}

/// Checks the Ruby internals read directly and interns the field symbols;
/// called once at load.
pub fn init(ruby: &Ruby) {
    foreach_fn();
    init_bignum();
    init_walk();
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
    each_pair(
        h,
        #[inline(always)]
        |k, v| {
            let name = match field_symbol(syms, k, &mut hint) {
                Some(name) => name,
                None => match field_other(k) {
                    Ok(Some(name)) => name,
                    Ok(None) => return true,
                    Err(p) => {
                        problem = Some(("key".to_owned(), p));
                        return false;
                    }
                },
            };
            match f(name, v) {
                Ok(()) => true,
                Err(p) => {
                    problem = Some(p);
                    false
                }
            }
        },
    );
    problem.map_or(Ok(()), Err)
}

#[inline(always)]
fn at<T>(field: Field, r: Result<T, Problem>) -> Result<T, (String, Problem)> {
    match r {
        Ok(v) => Ok(v),
        Err(p) => Err(placed(field, p)),
    }
}

#[cold]
#[inline(never)]
fn placed(field: Field, p: Problem) -> (String, Problem) {
    (field.name().to_owned(), p)
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
    while let Some(item) = array_item(a, out.len()) {
        out.push(f(ruby, item).map_err(|p| format!("[{}] {p}", out.len()))?);
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

#[inline(always)]
fn error_flag(ruby: &Ruby, v: Value) -> Result<i32, Problem> {
    if let Some(i) = fixnum(v) {
        if let Ok(i) = i32::try_from(i) {
            return Ok(i);
        }
    }
    error_other(ruby, v)
}

#[cold]
#[inline(never)]
fn error_other(ruby: &Ruby, v: Value) -> Result<i32, Problem> {
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
    fields(
        h,
        #[inline(always)]
        |name, v| {
            match name {
                Field::TraceId => {
                    s.trace_id = at(name, b.trace_id(v))?;
                    has_trace = true;
                }
                Field::SpanId => {
                    s.span_id = at(name, nonzero(id64(v)))?;
                    has_span = true;
                }
                Field::ParentId if !v.is_nil() => s.parent_id = at(name, b.parent_id(v))?,
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
                Field::MetaStruct | Field::SpanLinks | Field::SpanEvents => {
                    rare_field(ruby, b, &mut rare, name, v)?
                }
                _ => {}
            }
            Ok(())
        },
    )?;
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

/// A rare span field (meta_struct, span_links, span_events), into
/// `rare`. Out of line, so that the common fields' path stays small.
#[cold]
#[inline(never)]
fn rare_field(
    ruby: &Ruby,
    b: &mut Builder,
    rare: &mut Option<SpanExtras>,
    name: Field,
    v: Value,
) -> Result<(), (String, Problem)> {
    let rare = rare.get_or_insert_with(SpanExtras::default);
    match name {
        Field::MetaStruct => rare.meta_struct = at(name, opt_pairs(ruby, v, meta_struct_value))?,
        Field::SpanLinks => rare.span_links = at(name, list(ruby, v, span_link))?,
        Field::SpanEvents => rare.span_events = at(name, list(ruby, v, span_event))?,
        _ => {}
    }
    // These may transcode (allocate) without the builder knowing: it
    // forgets what it remembers by address.
    b.forget();
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
        let sv = unsafe {
            let spans = a.as_slice();
            prefetch::ahead(spans, si);
            spans[si]
        };
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
