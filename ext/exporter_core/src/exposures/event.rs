//! One exposure event, kept as one buffer: the bytes the sidecar wire
//! carries for it.
//!
//! `Exposures#record` runs on the application's thread, and what it
//! allocates is freed by the worker on another thread. With one `String`
//! per field and per attribute key and value (a dozen per call), every
//! allocation missed the calling thread's malloc cache and took the
//! allocator's slow path: a third of the call. Packed, a new exposure is
//! one allocation, written straight from the Ruby Strings ([`Packer`]);
//! the worker reads it in place ([`Exposure::view`]) to write the JSON,
//! and a sidecar client hands the same bytes over as they are.
//!
//! Layout (little-endian; texts are a u32 length and UTF-8):
//! `timestamp_ms i64 | flag | allocation | variant | subject id |
//! attribute count u32 | (key, value)*`, a value being a tag then its
//! bytes: [`STRING`] a text, [`BOOL`] a u8, [`INT`] an i64, [`FLOAT`] the
//! f64's bits, [`ARRAY`] a u32 count then its values (an array at most
//! [`MAX_ATTRIBUTE_DEPTH`] arrays deep, then kept empty).
//!
//! An [`Exposure`] is well-formed by construction: [`Packer`] writes only
//! `&str`s and keeps the count itself, and bytes from a peer become one
//! only through [`Exposure::take`], which checks every length, tag, depth
//! and text.

use std::fmt;

use serde::ser::{Serialize, Serializer};

use crate::sidecar::wire::{Dec, Enc, WireError};
use crate::span::AttributeValue;

const STRING: u8 = 0;
const BOOL: u8 = 1;
const INT: u8 = 2;
const FLOAT: u8 = 3;
const ARRAY: u8 = 4;

/// Nesting allowed in attribute arrays (the gem's attributes are flat;
/// this bounds what a peer can make us recurse through).
pub const MAX_ATTRIBUTE_DEPTH: usize = 4;

/// The fewest bytes an event takes: timestamp, four empty texts, count.
pub const MIN_SIZE: usize = 8 + 4 * 4 + 4;

/// One exposure event (see the module doc).
#[derive(Clone, PartialEq)]
pub struct Exposure {
    buf: Vec<u8>,
}

/// An exposure's fields, borrowed from its buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct View<'a> {
    pub timestamp_ms: i64,
    pub flag: &'a str,
    pub allocation: &'a str,
    pub variant: &'a str,
    pub subject_id: &'a str,
    pub attributes: Attributes<'a>,
}

/// The subject attributes: an iterator of (key, value), serialized as a
/// JSON object.
#[derive(Clone, Copy, Default)]
pub struct Attributes<'a>(Cursor<'a>);

/// An attribute value, borrowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    String(&'a str),
    Bool(bool),
    Int(i64),
    Float(f64),
    Array(Items<'a>),
}

/// An array's values: an iterator, serialized as a JSON array.
#[derive(Clone, Copy)]
pub struct Items<'a>(Cursor<'a>);

/// `left` items still to read from `bytes`, at `depth`.
#[derive(Clone, Copy, Default)]
struct Cursor<'a> {
    left: usize,
    depth: usize,
    bytes: &'a [u8],
}

fn dec(bytes: &[u8]) -> Dec<'_> {
    Dec {
        buf: bytes,
        what: "exposure",
    }
}

/// Reads one value at `depth` (checked all through, nested arrays
/// included).
fn value<'a>(d: &mut Dec<'a>, depth: usize) -> Result<Value<'a>, WireError> {
    Ok(match d.u8()? {
        STRING => Value::String(d.text()?),
        BOOL => Value::Bool(d.u8()? != 0),
        INT => Value::Int(d.i64()?),
        FLOAT => Value::Float(f64::from_bits(d.u64()?)),
        ARRAY if depth <= MAX_ATTRIBUTE_DEPTH => {
            // Each value takes at least 2 bytes (a tag and a bool).
            let n = d.len(2)?;
            let start = d.buf;
            for _ in 0..n {
                value(d, depth + 1)?;
            }
            Value::Array(Items(Cursor {
                left: n,
                depth: depth + 1,
                bytes: &start[..start.len() - d.buf.len()],
            }))
        }
        _ => return Err(d.err()),
    })
}

/// Reads one event from the front of `d`.
fn read<'a>(d: &mut Dec<'a>) -> Result<View<'a>, WireError> {
    let timestamp_ms = d.i64()?;
    let (flag, allocation, variant, subject_id) = (d.text()?, d.text()?, d.text()?, d.text()?);
    // Each attribute takes at least 6 bytes (a key's length, a tag, a bool).
    let n = d.len(4 + 2)?;
    let start = d.buf;
    for _ in 0..n {
        d.text()?;
        value(d, 0)?;
    }
    Ok(View {
        timestamp_ms,
        flag,
        allocation,
        variant,
        subject_id,
        attributes: Attributes(Cursor {
            left: n,
            depth: 0,
            bytes: &start[..start.len() - d.buf.len()],
        }),
    })
}

impl<'a> Cursor<'a> {
    /// The next of the `left` items, read by `read` (checked when the
    /// event was made: an error cannot happen, and would end the items).
    fn next_with<T>(
        &mut self,
        read: impl FnOnce(&mut Dec<'a>, usize) -> Result<T, WireError>,
    ) -> Option<T> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let mut d = dec(self.bytes);
        let item = read(&mut d, self.depth).ok();
        self.bytes = d.buf;
        if item.is_none() {
            self.left = 0;
        }
        item
    }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = (&'a str, Value<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        self.0
            .next_with(|d, depth| Ok((d.text()?, value(d, depth)?)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.0.left))
    }
}

impl<'a> Iterator for Items<'a> {
    type Item = Value<'a>;

    fn next(&mut self) -> Option<Value<'a>> {
        self.0.next_with(value)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.0.left))
    }
}

impl PartialEq for Attributes<'_> {
    fn eq(&self, other: &Self) -> bool {
        (*self).eq(*other)
    }
}

impl PartialEq for Items<'_> {
    fn eq(&self, other: &Self) -> bool {
        (*self).eq(*other)
    }
}

impl fmt::Debug for Attributes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(*self).finish()
    }
}

impl fmt::Debug for Items<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(*self).finish()
    }
}

impl Serialize for Value<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Value::String(v) => s.serialize_str(v),
            Value::Bool(v) => s.serialize_bool(v),
            Value::Int(v) => s.serialize_i64(v),
            Value::Float(v) => s.serialize_f64(v),
            Value::Array(items) => s.collect_seq(items),
        }
    }
}

impl Serialize for Attributes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(*self)
    }
}

impl From<Value<'_>> for AttributeValue {
    fn from(v: Value<'_>) -> AttributeValue {
        match v {
            Value::String(s) => AttributeValue::String(s.to_owned()),
            Value::Bool(b) => AttributeValue::Bool(b),
            Value::Int(i) => AttributeValue::Int(i),
            Value::Float(f) => AttributeValue::Float(f),
            Value::Array(items) => AttributeValue::Array(items.map(Into::into).collect()),
        }
    }
}

impl Exposure {
    /// An event built in Rust (the listener's tests, tools): packed as
    /// the calling thread packs one. Arrays nested deeper than
    /// [`MAX_ATTRIBUTE_DEPTH`] are kept empty.
    pub fn new(
        timestamp_ms: i64,
        flag: &str,
        allocation: &str,
        variant: &str,
        subject_id: &str,
        attributes: &[(String, AttributeValue)],
    ) -> Exposure {
        fn put(p: &mut Packer, v: &AttributeValue, depth: usize) {
            match v {
                AttributeValue::String(s) => p.string(s),
                AttributeValue::Bool(b) => p.bool(*b),
                AttributeValue::Int(i) => p.int(*i),
                AttributeValue::Float(f) => p.float(*f),
                AttributeValue::Array(items) => {
                    let items = if depth < MAX_ATTRIBUTE_DEPTH {
                        &items[..]
                    } else {
                        &[]
                    };
                    p.array_head(items.len());
                    for item in items {
                        put(p, item, depth + 1);
                    }
                }
            }
        }
        let mut p = Packer::new(256, timestamp_ms);
        for s in [flag, allocation, variant, subject_id] {
            p.text(s);
        }
        p.begin_attributes();
        for (k, v) in attributes {
            p.key(k);
            put(&mut p, v, 0);
        }
        p.finish()
    }

    /// Its fields, read in place.
    pub fn view(&self) -> View<'_> {
        // Well-formed by construction (see the module doc): were it not
        // (a bug), its fields would read as empty rather than panic.
        let view = read(&mut dec(&self.buf));
        debug_assert!(view.is_ok(), "malformed exposure");
        view.unwrap_or_default()
    }

    /// Its bytes, as the sidecar wire carries them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Takes one event off the front of `d` (a peer's bytes), checking
    /// all of it.
    pub(crate) fn take(d: &mut Dec<'_>) -> Result<Exposure, WireError> {
        let start = d.buf;
        read(d)?;
        Ok(Exposure {
            buf: start[..start.len() - d.buf.len()].to_vec(),
        })
    }
}

impl fmt::Debug for Exposure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.view().fmt(f)
    }
}

/// Where a [`Packer`] was: [`Packer::truncate`] goes back to it.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    len: usize,
    count: u32,
}

/// Writes one exposure into one buffer, in the order of the module doc:
/// [`Packer::text`] four times (flag, allocation, variant, subject id),
/// [`Packer::begin_attributes`], then a [`Packer::key`] and a value per
/// attribute; [`Packer::finish`].
#[derive(Debug)]
pub struct Packer {
    buf: Vec<u8>,
    /// Where the attribute count goes (0: not begun).
    count_at: usize,
    count: u32,
}

impl Packer {
    /// A packer whose buffer holds `capacity` bytes before it grows.
    pub fn new(capacity: usize, timestamp_ms: i64) -> Packer {
        let mut buf = Vec::with_capacity(capacity.max(MIN_SIZE));
        Enc(&mut buf).i64(timestamp_ms);
        Packer {
            buf,
            count_at: 0,
            count: 0,
        }
    }

    /// One of the four texts before the attributes.
    #[inline]
    pub fn text(&mut self, s: &str) {
        Enc(&mut self.buf).str(s);
    }

    #[inline]
    pub fn begin_attributes(&mut self) {
        self.count_at = self.buf.len();
        Enc(&mut self.buf).u32(0);
    }

    /// An attribute's key: a value must follow (or a
    /// [`Packer::truncate`] to a mark taken before the key).
    #[inline]
    pub fn key(&mut self, s: &str) {
        self.count += 1;
        Enc(&mut self.buf).str(s);
    }

    #[inline]
    pub fn string(&mut self, s: &str) {
        let mut e = Enc(&mut self.buf);
        e.u8(STRING);
        e.str(s);
    }

    #[inline]
    pub fn bool(&mut self, b: bool) {
        self.tagged(BOOL, &[u8::from(b)]);
    }

    #[inline]
    pub fn int(&mut self, i: i64) {
        self.tagged(INT, &i.to_le_bytes());
    }

    #[inline]
    pub fn float(&mut self, f: f64) {
        self.tagged(FLOAT, &f.to_bits().to_le_bytes());
    }

    /// An array of `n` values: the values follow.
    fn array_head(&mut self, n: usize) {
        self.tagged(ARRAY, &(n as u32).to_le_bytes());
    }

    /// A value of fixed size: its tag, then its bytes.
    #[inline]
    fn tagged(&mut self, tag: u8, bytes: &[u8]) {
        self.buf.push(tag);
        self.buf.extend_from_slice(bytes);
    }

    #[inline]
    pub fn mark(&self) -> Mark {
        Mark {
            len: self.buf.len(),
            count: self.count,
        }
    }

    /// Undoes what was written since `mark`.
    #[inline]
    pub fn truncate(&mut self, mark: Mark) {
        self.buf.truncate(mark.len);
        self.count = mark.count;
    }

    pub fn finish(mut self) -> Exposure {
        if self.count_at == 0 {
            self.begin_attributes();
        }
        let at = self.count_at;
        self.buf[at..at + 4].copy_from_slice(&self.count.to_le_bytes());
        let e = Exposure { buf: self.buf };
        debug_assert!(read(&mut dec(&e.buf)).is_ok(), "packed out of order");
        e
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An exposure with every kind of attribute value.
    pub(crate) fn sample() -> Exposure {
        Exposure::new(
            1_700_000_000_000,
            "flag",
            "alloc",
            "on",
            "user-é",
            &[
                ("plan".into(), AttributeValue::String("pro".into())),
                ("age".into(), AttributeValue::Int(-30)),
                ("ratio".into(), AttributeValue::Float(0.25)),
                ("beta".into(), AttributeValue::Bool(true)),
                (
                    "list".into(),
                    AttributeValue::Array(vec![
                        AttributeValue::Int(1),
                        AttributeValue::Array(vec![AttributeValue::String("x".into())]),
                    ]),
                ),
            ],
        )
    }

    #[test]
    fn reads_back_what_was_packed() {
        let e = sample();
        let v = e.view();
        assert_eq!(
            (
                v.timestamp_ms,
                v.flag,
                v.allocation,
                v.variant,
                v.subject_id
            ),
            (1_700_000_000_000, "flag", "alloc", "on", "user-é")
        );
        let attrs: Vec<(&str, AttributeValue)> = v.attributes.map(|(k, v)| (k, v.into())).collect();
        assert_eq!(attrs[0], ("plan", AttributeValue::String("pro".into())));
        assert_eq!(attrs[2], ("ratio", AttributeValue::Float(0.25)));
        assert_eq!(
            attrs[4].1,
            AttributeValue::Array(vec![
                AttributeValue::Int(1),
                AttributeValue::Array(vec![AttributeValue::String("x".into())]),
            ])
        );
        assert_eq!(
            serde_json::to_value(v.attributes).unwrap(),
            serde_json::json!({"plan": "pro", "age": -30, "ratio": 0.25, "beta": true, "list": [1, ["x"]]})
        );
    }

    #[test]
    fn take_checks_every_byte_and_takes_only_its_own() {
        let e = sample();
        let mut bytes = e.as_bytes().to_vec();
        bytes.extend_from_slice(b"next");
        let mut d = dec(&bytes);
        assert_eq!(Exposure::take(&mut d), Ok(e.clone()));
        assert_eq!(d.buf, b"next");
        for cut in 0..e.as_bytes().len() {
            assert!(Exposure::take(&mut dec(&e.as_bytes()[..cut])).is_err());
        }
        // Any single corrupted byte: an error or a well-formed event.
        for i in 0..e.as_bytes().len() {
            for b in [0u8, 0x7f, 0xff] {
                let mut bad = e.as_bytes().to_vec();
                bad[i] = b;
                if let Ok(x) = Exposure::take(&mut dec(&bad)) {
                    assert!(read(&mut dec(x.as_bytes())).is_ok());
                }
            }
        }
        // Invalid UTF-8 in a text.
        let mut bad = e.as_bytes().to_vec();
        bad[12] = 0xff;
        assert!(Exposure::take(&mut dec(&bad)).is_err());
    }

    #[test]
    fn depth_is_bounded_both_ways() {
        let mut deep = AttributeValue::Int(1);
        for _ in 0..10 {
            deep = AttributeValue::Array(vec![deep]);
        }
        let e = Exposure::new(0, "f", "a", "v", "s", &[("d".into(), deep)]);
        let json = serde_json::to_string(&e.view().attributes).unwrap();
        assert_eq!(json, r#"{"d":[[[[[]]]]]}"#);
        // A peer's deeper array is refused.
        let mut p = Packer::new(0, 0);
        for s in ["f", "a", "v", "s"] {
            p.text(s);
        }
        p.begin_attributes();
        p.key("d");
        for _ in 0..MAX_ATTRIBUTE_DEPTH + 2 {
            p.array_head(1);
        }
        p.int(1);
        let mut bytes = p.buf.clone();
        let at = p.count_at;
        bytes[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
        assert!(Exposure::take(&mut dec(&bytes)).is_err());
    }

    #[test]
    fn truncate_undoes_a_key() {
        let mut p = Packer::new(0, 5);
        for s in ["f", "a", "v", "s"] {
            p.text(s);
        }
        p.begin_attributes();
        let m = p.mark();
        p.key("dropped");
        p.truncate(m);
        p.key("kept");
        p.bool(false);
        let e = p.finish();
        let attrs: Vec<_> = e.view().attributes.collect();
        assert_eq!(attrs, [("kept", Value::Bool(false))]);
        // No attributes at all.
        let mut p = Packer::new(0, 5);
        for s in ["f", "a", "v", "s"] {
            p.text(s);
        }
        assert_eq!(p.finish().view().attributes.count(), 0);
    }
}
