//! One evaluation as the calling thread captures it: every text and the
//! context written into a single buffer, unpacked by the worker.
//!
//! `record` runs on the application's thread, and what it allocated was
//! freed by the worker on another thread: every allocation missed the
//! calling thread's malloc cache (its chunks were always freed elsewhere),
//! took the allocator's slow path and its arena lock, contended by the
//! worker's frees. With one `String` per field and per context key and
//! value (a dozen per call) that was a third of the call's instructions;
//! one buffer per call still cost a tenth to a half of the call in wall
//! time. So the calling thread packs into a buffer it keeps
//! ([`Packer::with_buffer`]) and the worker's queue holds evaluations
//! back to back in one buffer of its own ([`PackedQueue`]): a call
//! allocates nothing, and nothing is freed across threads.
//!
//! The layout is private to this module: tagged values (`TEXT` is a u32
//! length and UTF-8 bytes, numbers are 8 little-endian bytes, `MAP` and
//! `LIST` a u32 count then their entries) in a fixed order: flag, variant,
//! allocation, targeting key, error code, error message, then the context
//! as a `MAP`. The packer only ever writes well-formed buffers; unpacking
//! still checks every length and bounds its depth, so a bug cannot read
//! out of bounds or recurse without end.

use super::aggregate::Evaluation;
use super::context::Captured;

const NONE: u8 = 0;
const TEXT: u8 = 1;
const INT: u8 = 2;
const FLOAT: u8 = 3;
const TRUE: u8 = 4;
const FALSE: u8 = 5;
const MAP: u8 = 6;
const LIST: u8 = 7;
const SKIPPED: u8 = 8;

/// Deepest nesting [`PackedRef::unpack`] accepts (the capture stops at
/// `context::MAX_DEPTH` levels below the top).
const MAX_UNPACK_DEPTH: usize = 16;

/// A captured evaluation that owns its buffer (tests build them).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    buf: Vec<u8>,
    timestamp_ms: i64,
    full_data: bool,
}

/// A captured evaluation borrowed where it was packed: from a [`Packer`]
/// or a [`PackedQueue`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PackedRef<'a> {
    buf: &'a [u8],
    timestamp_ms: i64,
    full_data: bool,
}

/// Evaluations packed back to back in one buffer: the queue between the
/// calling threads and the worker. An entry is its body's length (u64),
/// the time (i64), the consent (u8), then the body as [`Packer`] wrote it.
/// Cleared, it keeps its capacity.
#[derive(Debug, Default)]
pub struct PackedQueue {
    bytes: Vec<u8>,
    count: usize,
}

const ENTRY_HEADER: usize = 8 + 8 + 1;

impl PackedQueue {
    pub fn new() -> PackedQueue {
        PackedQueue::default()
    }

    /// Evaluations queued.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes reserved.
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    pub fn push(&mut self, e: PackedRef<'_>) {
        self.bytes.reserve(ENTRY_HEADER + e.buf.len());
        self.bytes
            .extend_from_slice(&(e.buf.len() as u64).to_le_bytes());
        self.bytes.extend_from_slice(&e.timestamp_ms.to_le_bytes());
        self.bytes.push(u8::from(e.full_data));
        self.bytes.extend_from_slice(e.buf);
        self.count += 1;
    }

    /// Empties the queue, keeping its capacity up to `keep` bytes.
    pub fn clear(&mut self, keep: usize) {
        self.bytes.clear();
        self.bytes.shrink_to(keep);
        self.count = 0;
    }

    /// The queued evaluations, in order. [`PackedQueue::push`] is the only
    /// writer, so every entry is whole; were one not, the iteration would
    /// end there (the caller counts what it did not see).
    pub fn iter(&self) -> impl Iterator<Item = PackedRef<'_>> {
        let mut rest: &[u8] = &self.bytes;
        std::iter::from_fn(move || {
            let (header, tail) = rest.split_at_checked(ENTRY_HEADER)?;
            let len = u64::from_le_bytes(header[..8].try_into().ok()?);
            let (buf, tail) = tail.split_at_checked(usize::try_from(len).ok()?)?;
            rest = tail;
            Some(PackedRef {
                buf,
                timestamp_ms: i64::from_le_bytes(header[8..16].try_into().ok()?),
                full_data: header[16] != 0,
            })
        })
    }
}

/// A buffer that does not unpack (a bug: the packer wrote it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed packed evaluation: {}", self.0)
    }
}

/// Writes one evaluation. Fields go in the order of the module doc:
/// `text`/`opt_text` six times, then the context map.
#[derive(Debug)]
pub struct Packer {
    buf: Vec<u8>,
}

impl Default for Packer {
    fn default() -> Self {
        Packer::new()
    }
}

impl Packer {
    pub fn new() -> Packer {
        Packer::with_buffer(Vec::with_capacity(256))
    }

    /// A packer writing into `buf` (emptied first): a buffer kept by the
    /// calling thread from one call to the next, taken back with
    /// [`Packer::into_buffer`].
    pub fn with_buffer(mut buf: Vec<u8>) -> Packer {
        buf.clear();
        Packer { buf }
    }

    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// What was written, as one evaluation, for [`PackedQueue::push`].
    pub fn packed(&self, timestamp_ms: i64, full_data: bool) -> PackedRef<'_> {
        PackedRef {
            buf: &self.buf,
            timestamp_ms,
            full_data,
        }
    }

    /// Where the next byte goes: pass it to [`Packer::truncate`] to undo
    /// what was written since.
    pub fn mark(&self) -> usize {
        self.buf.len()
    }

    pub fn truncate(&mut self, mark: usize) {
        self.buf.truncate(mark);
    }

    fn len_prefixed(&mut self, s: &str) {
        // Texts are bounded by the caller (Ruby Strings < 4 GiB).
        self.buf
            .extend_from_slice(&(s.len().min(u32::MAX as usize) as u32).to_le_bytes());
        self.buf
            .extend_from_slice(&s.as_bytes()[..s.len().min(u32::MAX as usize)]);
    }

    pub fn text(&mut self, s: &str) {
        self.buf.push(TEXT);
        self.len_prefixed(s);
    }

    pub fn none(&mut self) {
        self.buf.push(NONE);
    }

    pub fn int(&mut self, i: i64) {
        self.buf.push(INT);
        self.buf.extend_from_slice(&i.to_le_bytes());
    }

    pub fn float(&mut self, f: f64) {
        self.buf.push(FLOAT);
        self.buf.extend_from_slice(&f.to_le_bytes());
    }

    pub fn bool(&mut self, b: bool) {
        self.buf.push(if b { TRUE } else { FALSE });
    }

    /// A list position whose value is not kept.
    pub fn skipped(&mut self) {
        self.buf.push(SKIPPED);
    }

    /// A map key (entries are a key, then a value).
    pub fn key(&mut self, s: &str) {
        self.len_prefixed(s);
    }

    /// Opens a map; close it with [`Packer::end`] and its entry count.
    pub fn begin_map(&mut self) -> usize {
        self.begin(MAP)
    }

    /// Opens a list; close it with [`Packer::end`] and its item count.
    pub fn begin_list(&mut self) -> usize {
        self.begin(LIST)
    }

    fn begin(&mut self, tag: u8) -> usize {
        self.buf.push(tag);
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        at
    }

    pub fn end(&mut self, opened: usize, count: u32) {
        self.buf[opened..opened + 4].copy_from_slice(&count.to_le_bytes());
    }

    #[cfg(test)]
    pub fn finish(self, timestamp_ms: i64, full_data: bool) -> Packed {
        Packed {
            buf: self.buf,
            timestamp_ms,
            full_data,
        }
    }
}

/// Reads a buffer written by [`Packer`].
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(Malformed("truncated"))?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.bytes(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn eight(&mut self) -> Result<[u8; 8], Malformed> {
        let b = self.bytes(8)?;
        let mut out = [0; 8];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn string(&mut self) -> Result<String, Malformed> {
        let n = self.u32()? as usize;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| Malformed("text is not UTF-8"))
    }

    fn opt_text(&mut self) -> Result<Option<String>, Malformed> {
        match self.u8()? {
            NONE => Ok(None),
            TEXT => self.string().map(Some),
            _ => Err(Malformed("expected a text or none")),
        }
    }

    fn map(&mut self, depth: usize) -> Result<Vec<(String, Captured)>, Malformed> {
        if depth > MAX_UNPACK_DEPTH {
            return Err(Malformed("nested too deep"));
        }
        let n = self.u32()? as usize;
        // Each entry takes at least 5 bytes: no count can make us reserve
        // more than the buffer could hold.
        let mut out = Vec::with_capacity(n.min(self.buf.len() / 5));
        for _ in 0..n {
            let k = self.string()?;
            let v = self.value(depth)?;
            out.push((k, v));
        }
        Ok(out)
    }

    fn value(&mut self, depth: usize) -> Result<Captured, Malformed> {
        Ok(match self.u8()? {
            TEXT => Captured::Str(self.string()?),
            INT => Captured::Int(i64::from_le_bytes(self.eight()?)),
            FLOAT => Captured::Float(f64::from_le_bytes(self.eight()?)),
            TRUE => Captured::Bool(true),
            FALSE => Captured::Bool(false),
            SKIPPED => Captured::Skipped,
            MAP => Captured::Map(self.map(depth + 1)?),
            LIST => {
                if depth + 1 > MAX_UNPACK_DEPTH {
                    return Err(Malformed("nested too deep"));
                }
                let n = self.u32()? as usize;
                let mut out = Vec::with_capacity(n.min(self.buf.len()));
                for _ in 0..n {
                    out.push(self.value(depth + 1)?);
                }
                Captured::List(out)
            }
            _ => return Err(Malformed("unknown tag")),
        })
    }
}

#[cfg(test)]
impl Packed {
    pub fn as_ref(&self) -> PackedRef<'_> {
        PackedRef {
            buf: &self.buf,
            timestamp_ms: self.timestamp_ms,
            full_data: self.full_data,
        }
    }

    pub fn unpack(&self) -> Result<Evaluation, Malformed> {
        self.as_ref().unpack()
    }
}

impl PackedRef<'_> {
    /// The evaluation, on the worker (where its allocations are freed too).
    pub fn unpack(&self) -> Result<Evaluation, Malformed> {
        let mut r = Reader {
            buf: self.buf,
            at: 0,
        };
        let flag = r.opt_text()?.ok_or(Malformed("no flag"))?;
        let variant = r.opt_text()?;
        let allocation = r.opt_text()?;
        let targeting_key = r.opt_text()?;
        let error_code = r.opt_text()?;
        let error_message = r.opt_text()?;
        if r.u8()? != MAP {
            return Err(Malformed("expected the context map"));
        }
        let context = r.map(0)?;
        if r.at != self.buf.len() {
            return Err(Malformed("trailing bytes"));
        }
        Ok(Evaluation {
            flag,
            variant,
            allocation,
            targeting_key,
            context,
            error_code,
            error_message,
            timestamp_ms: self.timestamp_ms,
            full_data: self.full_data,
        })
    }
}

#[cfg(test)]
impl From<&Evaluation> for Packed {
    /// Packs an evaluation built in Rust (tests, tools).
    fn from(e: &Evaluation) -> Packed {
        fn value(p: &mut Packer, v: &Captured) {
            match v {
                Captured::Str(s) => p.text(s),
                Captured::Int(i) => p.int(*i),
                Captured::Float(f) => p.float(*f),
                Captured::Bool(b) => p.bool(*b),
                Captured::Skipped => p.skipped(),
                Captured::Map(fields) => map(p, fields),
                Captured::List(items) => {
                    let at = p.begin_list();
                    for i in items {
                        value(p, i);
                    }
                    p.end(at, items.len() as u32);
                }
            }
        }
        fn map(p: &mut Packer, fields: &[(String, Captured)]) {
            let at = p.begin_map();
            for (k, v) in fields {
                p.key(k);
                value(p, v);
            }
            p.end(at, fields.len() as u32);
        }
        let mut p = Packer::new();
        p.text(&e.flag);
        for f in [
            &e.variant,
            &e.allocation,
            &e.targeting_key,
            &e.error_code,
            &e.error_message,
        ] {
            match f {
                Some(s) => p.text(s),
                None => p.none(),
            }
        }
        map(&mut p, &e.context);
        p.finish(e.timestamp_ms, e.full_data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Evaluation {
        Evaluation {
            flag: "checkout".into(),
            variant: Some("on".into()),
            allocation: None,
            targeting_key: Some("user-é".into()),
            context: vec![
                ("plan".into(), Captured::Str("pro".into())),
                ("age".into(), Captured::Int(-30)),
                ("ratio".into(), Captured::Float(0.25)),
                (
                    "nested".into(),
                    Captured::Map(vec![(
                        "list".into(),
                        Captured::List(vec![
                            Captured::Bool(true),
                            Captured::Skipped,
                            Captured::Bool(false),
                        ]),
                    )]),
                ),
            ],
            error_code: None,
            error_message: Some("".into()),
            timestamp_ms: 1_760_000_000_123,
            full_data: true,
        }
    }

    #[test]
    fn round_trips() {
        let e = sample();
        assert_eq!(Packed::from(&e).unpack().unwrap(), e);
        let bare = Evaluation {
            context: vec![],
            full_data: false,
            ..sample()
        };
        assert_eq!(Packed::from(&bare).unpack().unwrap(), bare);
    }

    #[test]
    fn a_queue_holds_evaluations_back_to_back() {
        let a = sample();
        let b = Evaluation {
            context: vec![],
            full_data: false,
            timestamp_ms: -1,
            ..sample()
        };
        let mut q = PackedQueue::new();
        // Packed by one reused buffer, as the calling thread does.
        let mut buf = Vec::new();
        for e in [&a, &b, &a] {
            let mut p = Packer::with_buffer(buf);
            let owned = Packed::from(e);
            p.buf.extend_from_slice(&owned.buf);
            q.push(p.packed(e.timestamp_ms, e.full_data));
            buf = p.into_buffer();
        }
        assert_eq!(q.len(), 3);
        let out: Vec<Evaluation> = q.iter().map(|p| p.unpack().unwrap()).collect();
        assert_eq!(out, vec![a.clone(), b, a]);

        // A torn entry (not something `push` writes) ends the iteration.
        let whole = q.bytes.len();
        q.bytes.truncate(whole - 1);
        assert_eq!(q.iter().count(), 2);
        q.bytes.truncate(ENTRY_HEADER - 1);
        assert_eq!(q.iter().count(), 0);

        // Cleared, it keeps at most the capacity asked for.
        q.bytes.reserve(1 << 16);
        q.clear(1024);
        assert!(q.is_empty() && q.iter().next().is_none());
        assert!(q.capacity() < 1 << 16);
    }

    #[test]
    fn malformed_buffers_are_errors_not_panics() {
        let good = Packed::from(&sample());
        // Every truncation, and every single-byte corruption.
        for n in 0..good.buf.len() {
            let mut p = good.clone();
            p.buf.truncate(n);
            assert!(p.unpack().is_err(), "truncated at {n}");
        }
        for i in 0..good.buf.len() {
            for b in [0u8, 0x7f, 0xff] {
                let mut p = good.clone();
                p.buf[i] = b;
                let _ = p.unpack();
            }
        }
        // A count far larger than the buffer reserves nothing huge.
        let mut p = Packer::new();
        p.text("f");
        for _ in 0..5 {
            p.none();
        }
        let at = p.begin_map();
        p.end(at, u32::MAX);
        assert!(p.finish(0, true).unpack().is_err());
    }

    #[test]
    fn depth_is_bounded() {
        let mut p = Packer::new();
        p.text("f");
        for _ in 0..5 {
            p.none();
        }
        let mut opened = Vec::new();
        opened.push(p.begin_map());
        for _ in 0..100 {
            p.key("k");
            opened.push(p.begin_map());
        }
        let innermost = opened.pop().unwrap();
        p.end(innermost, 0);
        while let Some(at) = opened.pop() {
            p.end(at, 1);
        }
        assert_eq!(
            p.finish(0, true).unpack(),
            Err(Malformed("nested too deep"))
        );
    }

    #[test]
    fn truncate_undoes_a_key() {
        let mut p = Packer::new();
        p.text("f");
        for _ in 0..5 {
            p.none();
        }
        let at = p.begin_map();
        let mark = p.mark();
        p.key("dropped");
        p.truncate(mark);
        p.key("kept");
        p.int(1);
        p.end(at, 1);
        let e = p.finish(5, true).unpack().unwrap();
        assert_eq!(e.context, vec![("kept".into(), Captured::Int(1))]);
    }
}
