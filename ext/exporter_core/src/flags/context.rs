//! Evaluation contexts: pruning a captured context into the flat map that
//! is sent, and the canonical key that identifies it in a row.
//!
//! The calling thread only captures a context ([`Captured`]: Strings copied,
//! nesting bounded, cycles cut). Everything else happens here, on the
//! worker: [`prune`] flattens nested values (`a.b`, lists `a.0`, at most
//! [`MAX_DEPTH`] levels below the top), skips keys and strings over
//! [`MAX_CHARS`] characters (they do not count), sorts by key and keeps the
//! first [`MAX_FIELDS`] fields. [`Canonical`] is the exact, type-tagged,
//! length-delimited encoding of that pruned map: two contexts are one row
//! exactly when their encodings are equal (1 and "1" differ, key order
//! does not matter). It is not a hash, and it decodes back into the map
//! that is sent, so a row stores its context once.

/// Fields kept after sorting.
pub const MAX_FIELDS: usize = 256;
/// Longest key or String value kept, in characters.
pub const MAX_CHARS: usize = 256;
/// Nesting levels flattened below the top-level keys: `a.b.c.d.e` is kept,
/// anything deeper is skipped.
pub const MAX_DEPTH: usize = 4;
/// Values (containers included) a capture visits at most: a context
/// sharing one Hash many times over cannot make the calling thread walk
/// without bound. Past it, the rest of the context is not captured.
pub const MAX_CAPTURED_NODES: usize = 65_536;

/// A context value as captured on the calling thread: only the kinds that
/// can be kept (String and Symbol as `Str`, 64-bit Integer, finite Float,
/// true/false) and the containers holding them.
#[derive(Debug, Clone, PartialEq)]
pub enum Captured {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Map(Vec<(String, Captured)>),
    List(Vec<Captured>),
    /// A list position whose value is not kept (the others keep their
    /// index).
    Skipped,
}

/// A kept value of a pruned context; each keeps its JSON type.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

fn too_long(s: &str) -> bool {
    // Bytes bound characters from above: only long texts are counted.
    s.len() > MAX_CHARS && s.chars().count() > MAX_CHARS
}

fn flatten(prefix: String, value: Captured, depth: usize, out: &mut Vec<(String, Scalar)>) {
    if too_long(&prefix) {
        return;
    }
    let scalar = match value {
        Captured::Str(s) if too_long(&s) => return,
        Captured::Str(s) => Scalar::Str(s),
        Captured::Int(i) => Scalar::Int(i),
        Captured::Float(f) if !f.is_finite() => return,
        Captured::Float(f) => Scalar::Float(f),
        Captured::Bool(b) => Scalar::Bool(b),
        Captured::Skipped => return,
        Captured::Map(fields) => {
            if depth < MAX_DEPTH {
                for (k, v) in fields {
                    flatten(format!("{prefix}.{k}"), v, depth + 1, out);
                }
            }
            return;
        }
        Captured::List(items) => {
            if depth < MAX_DEPTH {
                for (i, v) in items.into_iter().enumerate() {
                    flatten(format!("{prefix}.{i}"), v, depth + 1, out);
                }
            }
            return;
        }
    };
    out.push((prefix, scalar));
}

/// Flattens, filters, sorts and cuts a captured context (see the module
/// doc). When two paths flatten to the same key (`{"a.b" => 1}` and
/// `{"a" => {"b" => 2}}`), the first captured is kept.
pub fn prune(fields: Vec<(String, Captured)>) -> Vec<(String, Scalar)> {
    let mut out = Vec::with_capacity(fields.len());
    for (k, v) in fields {
        flatten(k, v, 0, &mut out);
    }
    // Stable: among equal keys the first captured stays first.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|later, earlier| later.0 == earlier.0);
    out.truncate(MAX_FIELDS);
    out
}

const TAG_STR: u8 = b's';
const TAG_INT: u8 = b'i';
const TAG_FLOAT: u8 = b'f';
const TAG_BOOL: u8 = b'b';

/// The canonical encoding of a pruned context: for each field in key
/// order, `len(key) key tag value`, lengths as u32 LE, Integers and
/// Floats (their bits) as 8 bytes LE, booleans as one byte. Empty for an
/// empty (or absent) context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Canonical(Vec<u8>);

fn put_text(out: &mut Vec<u8>, s: &str) {
    // Pruned texts are at most MAX_CHARS characters (1 KiB of UTF-8).
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Canonical {
    /// Encodes fields already sorted by [`prune`].
    pub fn encode(fields: &[(String, Scalar)]) -> Canonical {
        // Sized first: one allocation, no growth.
        let size = fields
            .iter()
            .map(|(k, v)| {
                4 + k.len()
                    + match v {
                        Scalar::Str(s) => 1 + 4 + s.len(),
                        Scalar::Int(_) | Scalar::Float(_) => 1 + 8,
                        Scalar::Bool(_) => 1 + 1,
                    }
            })
            .sum();
        let mut out = Vec::with_capacity(size);
        for (k, v) in fields {
            put_text(&mut out, k);
            match v {
                Scalar::Str(s) => {
                    out.push(TAG_STR);
                    put_text(&mut out, s);
                }
                Scalar::Int(i) => {
                    out.push(TAG_INT);
                    out.extend_from_slice(&i.to_le_bytes());
                }
                Scalar::Float(f) => {
                    out.push(TAG_FLOAT);
                    out.extend_from_slice(&f.to_bits().to_le_bytes());
                }
                Scalar::Bool(b) => {
                    out.push(TAG_BOOL);
                    out.push(u8::from(*b));
                }
            }
        }
        debug_assert_eq!(out.len(), size);
        Canonical(out)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes held (for sizing).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The encoded bytes (the sidecar's wire protocol carries them).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// A key received from another process. Bytes that are not a valid
    /// encoding are harmless: [`Canonical::fields`] stops at anything
    /// malformed, and the key still compares byte for byte.
    pub fn from_bytes(bytes: Vec<u8>) -> Canonical {
        Canonical(bytes)
    }

    /// The fields, decoded in key order.
    pub fn fields(&self) -> Fields<'_> {
        Fields(&self.0)
    }
}

/// A decoded field: borrowed key and value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScalarRef<'a> {
    Str(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// Iterator over a [`Canonical`]'s fields. Stops at anything malformed
/// (which [`Canonical::encode`] never writes).
pub struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            self.0 = &[];
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn eight(&mut self) -> Option<[u8; 8]> {
        self.take(8)?.try_into().ok()
    }

    fn text(&mut self) -> Option<&'a str> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(len)?).ok()
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (&'a str, ScalarRef<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let key = self.text()?;
        let value = match self.take(1)?[0] {
            TAG_STR => ScalarRef::Str(self.text()?),
            TAG_INT => ScalarRef::Int(i64::from_le_bytes(self.eight()?)),
            TAG_FLOAT => ScalarRef::Float(f64::from_bits(u64::from_le_bytes(self.eight()?))),
            TAG_BOOL => ScalarRef::Bool(self.take(1)?[0] != 0),
            _ => {
                self.0 = &[];
                return None;
            }
        };
        Some((key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Captured {
        Captured::Str(v.into())
    }

    fn keys(p: &[(String, Scalar)]) -> Vec<&str> {
        p.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn sorts_before_cutting_to_256_fields() {
        // Inserted in reverse order: a cut before sorting would keep the
        // last keys instead of the first.
        let fields: Vec<_> = (0..300)
            .rev()
            .map(|i| (format!("k{i:03}"), Captured::Int(i)))
            .collect();
        let p = prune(fields);
        assert_eq!(p.len(), MAX_FIELDS);
        assert_eq!(p[0], ("k000".into(), Scalar::Int(0)));
        assert_eq!(p[255], ("k255".into(), Scalar::Int(255)));
    }

    #[test]
    fn long_strings_and_keys_are_skipped_and_do_not_count() {
        let mut fields: Vec<_> = (0..300).map(|i| (format!("k{i:03}"), s("short"))).collect();
        // Sorting first: these would take places among the first 256.
        fields.push(("k000a".into(), s(&"x".repeat(257))));
        fields.push((format!("k000{}", "b".repeat(300)), s("v")));
        // 256 multi-byte characters are kept (more than 256 bytes).
        fields.push(("k000c".into(), s(&"é".repeat(256))));
        let p = prune(fields);
        assert_eq!(p.len(), 256);
        assert_eq!(keys(&p)[..3], ["k000", "k000c", "k001"]);
        assert_eq!(p[255].0, "k254");
    }

    #[test]
    fn flattens_maps_and_lists_to_four_levels() {
        let deep = Captured::Map(vec![(
            "b".into(),
            Captured::Map(vec![(
                "c".into(),
                Captured::Map(vec![(
                    "d".into(),
                    Captured::Map(vec![
                        ("e".into(), Captured::Int(5)),
                        (
                            "f".into(),
                            Captured::Map(vec![("g".into(), Captured::Int(6))]),
                        ),
                    ]),
                )]),
            )]),
        )]);
        let fields = vec![
            ("a".into(), deep),
            (
                "list".into(),
                Captured::List(vec![
                    s("x"),
                    Captured::Skipped,
                    Captured::Bool(true),
                    Captured::Float(f64::NAN),
                ]),
            ),
            ("n".into(), Captured::Float(1.5)),
        ];
        let p = prune(fields);
        assert_eq!(
            p,
            vec![
                ("a.b.c.d.e".into(), Scalar::Int(5)),
                ("list.0".into(), Scalar::Str("x".into())),
                ("list.2".into(), Scalar::Bool(true)),
                ("n".into(), Scalar::Float(1.5)),
            ]
        );
    }

    #[test]
    fn a_key_reached_twice_keeps_the_first() {
        let fields = vec![
            ("a.b".into(), Captured::Int(1)),
            (
                "a".into(),
                Captured::Map(vec![("b".into(), Captured::Int(2))]),
            ),
        ];
        assert_eq!(prune(fields), vec![("a.b".into(), Scalar::Int(1))]);
    }

    #[test]
    fn canonical_key_is_type_tagged_order_free_and_round_trips() {
        let one_int = prune(vec![("x".into(), Captured::Int(1))]);
        let one_str = prune(vec![("x".into(), s("1"))]);
        assert_ne!(Canonical::encode(&one_int), Canonical::encode(&one_str));

        let ab = prune(vec![("a".into(), s("1")), ("b".into(), Captured::Int(2))]);
        let ba = prune(vec![("b".into(), Captured::Int(2)), ("a".into(), s("1"))]);
        assert_eq!(Canonical::encode(&ab), Canonical::encode(&ba));

        // Length-delimited: texts cannot run into each other.
        let k1 = prune(vec![("ab".into(), s("c"))]);
        let k2 = prune(vec![("a".into(), s("bc"))]);
        assert_ne!(Canonical::encode(&k1), Canonical::encode(&k2));

        let fields = prune(vec![
            ("s".into(), s("é")),
            ("i".into(), Captured::Int(-7)),
            ("f".into(), Captured::Float(0.25)),
            ("b".into(), Captured::Bool(false)),
        ]);
        let c = Canonical::encode(&fields);
        let back: Vec<_> = c.fields().collect();
        assert_eq!(
            back,
            vec![
                ("b", ScalarRef::Bool(false)),
                ("f", ScalarRef::Float(0.25)),
                ("i", ScalarRef::Int(-7)),
                ("s", ScalarRef::Str("é")),
            ]
        );
        assert!(Canonical::encode(&[]).is_empty());
    }
}
