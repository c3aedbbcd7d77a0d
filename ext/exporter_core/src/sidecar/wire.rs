//! The sidecar wire protocol: what a client (a worker) and a listener (the
//! forking parent in thread mode, the helper process in subprocess mode)
//! say to each other over one Unix stream socket.
//!
//! It owns the byte layout and nothing else (no I/O): both sides feed it
//! bytes and get values back, so any transport that delivers a stream
//! (an inherited socketpair end, a named socket) speaks it as is.
//!
//! 1. Handshake, client first: [`Hello`] = magic `EXSC`, protocol version
//!    (u16), pid (u32), gem version (u16 length + UTF-8). The listener
//!    answers [`Welcome`] = magic, its protocol version, accept (0) or
//!    refuse (1) with a reason. A peer speaking another protocol version
//!    is refused after its first 6 bytes: nothing after them is decoded.
//! 2. Frames, both ways: `len u32 | kind u8 | seq u64 | payload`, `len`
//!    counting kind, seq and payload, at most [`MAX_FRAME`]. The client
//!    sends [`Kind::Traces`], [`Kind::Exposures`], [`Kind::Evaluations`]
//!    (and [`Kind::Status`], a request for the listener's counters);
//!    the listener answers each with [`Kind::Ack`] (it now holds the
//!    payload) or [`Kind::Nack`] (with a reason: full, refused) for the
//!    same seq. An `Ack`'s payload is empty or a u64: how many exposure
//!    dedup entries the listener has un-marked so far (events the agent
//!    refused for good or that were dropped; see [`ack_payload`]).
//!
//! Integers are little-endian; strings are u32 length + UTF-8. Anything
//! malformed is a [`WireError`], and the side that met it closes that
//! connection: it never guesses at the bytes that follow.

use bytes::{Bytes, BytesMut};

use crate::exposures::{self, Context, Exposure};
use crate::flags::aggregate::{Counts, Row, RowKey, Tier};
use crate::flags::context::Canonical;

/// First bytes of a [`Hello`] and a [`Welcome`].
pub const MAGIC: [u8; 4] = *b"EXSC";
/// Bumped whenever anything below changes meaning.
pub const PROTOCOL_VERSION: u16 = 1;
/// kind + seq.
const FRAME_HEAD: usize = 1 + 8;
/// len + kind + seq: the bytes before a frame's payload.
pub const FRAME_PREFIX: usize = 4 + FRAME_HEAD;
/// The largest frame (kind, seq and payload): a full 5 MiB trace body
/// plus its route, with room to spare.
pub const MAX_FRAME: usize = 5 * 1024 * 1024 + 64 * 1024;
/// The largest handshake message.
const MAX_HANDSHAKE_TEXT: usize = 1024;

/// What is wrong with bytes received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Not our protocol at all.
    BadMagic,
    /// Our protocol, another version of it.
    Version {
        theirs: u16,
        ours: u16,
    },
    /// A frame longer than [`MAX_FRAME`] (or shorter than its header).
    FrameSize(usize),
    UnknownKind(u8),
    /// A payload that does not decode as its kind says.
    Malformed(&'static str),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::BadMagic => f.write_str("not an exporter sidecar peer (bad magic)"),
            WireError::Version { theirs, ours } => {
                write!(f, "sidecar protocol version {theirs} is not ours ({ours})")
            }
            WireError::FrameSize(n) => write!(f, "frame of {n} bytes (limit {MAX_FRAME})"),
            WireError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            WireError::Malformed(what) => write!(f, "malformed {what}"),
        }
    }
}

impl std::error::Error for WireError {}

/// The client's first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u16,
    pub pid: u32,
    pub gem_version: String,
}

/// The listener's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Welcome {
    Accept,
    Refuse(String),
}

fn put_short_text(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(MAX_HANDSHAKE_TEXT)];
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s);
}

/// Checks the magic and version at the front of `buf` (as far as it
/// goes). `Ok(false)` while more bytes are needed to tell.
fn check_preamble(buf: &[u8]) -> Result<bool, WireError> {
    let n = buf.len().min(4);
    if buf[..n] != MAGIC[..n] {
        return Err(WireError::BadMagic);
    }
    if buf.len() < 6 {
        return Ok(false);
    }
    let theirs = u16::from_le_bytes([buf[4], buf[5]]);
    if theirs != PROTOCOL_VERSION {
        return Err(WireError::Version {
            theirs,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok(true)
}

/// A short text at `at` in `buf`: `None` while incomplete.
fn short_text(buf: &[u8], at: usize) -> Result<Option<(String, usize)>, WireError> {
    let Some(len) = buf.get(at..at + 2) else {
        return Ok(None);
    };
    let len = u16::from_le_bytes([len[0], len[1]]) as usize;
    if len > MAX_HANDSHAKE_TEXT {
        return Err(WireError::Malformed("handshake text"));
    }
    let Some(bytes) = buf.get(at + 2..at + 2 + len) else {
        return Ok(None);
    };
    let s = std::str::from_utf8(bytes).map_err(|_| WireError::Malformed("handshake text"))?;
    Ok(Some((s.to_owned(), at + 2 + len)))
}

impl Hello {
    /// A hello from this process.
    pub fn ours(gem_version: &str) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            gem_version: gem_version.to_owned(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&self.protocol.to_le_bytes());
        out.extend_from_slice(&self.pid.to_le_bytes());
        put_short_text(&mut out, &self.gem_version);
        out
    }

    /// The hello at the front of `buf` and its length; `None` while
    /// incomplete. A wrong magic or version is an error as soon as its
    /// bytes are in: what follows them is never read.
    pub fn decode(buf: &[u8]) -> Result<Option<(Hello, usize)>, WireError> {
        if !check_preamble(buf)? {
            return Ok(None);
        }
        let Some(pid) = buf.get(6..10) else {
            return Ok(None);
        };
        let pid = u32::from_le_bytes([pid[0], pid[1], pid[2], pid[3]]);
        Ok(short_text(buf, 10)?.map(|(gem_version, end)| {
            (
                Hello {
                    protocol: PROTOCOL_VERSION,
                    pid,
                    gem_version,
                },
                end,
            )
        }))
    }
}

impl Welcome {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        match self {
            Welcome::Accept => {
                out.push(0);
                put_short_text(&mut out, "");
            }
            Welcome::Refuse(reason) => {
                out.push(1);
                put_short_text(&mut out, reason);
            }
        }
        out
    }

    /// As [`Hello::decode`].
    pub fn decode(buf: &[u8]) -> Result<Option<(Welcome, usize)>, WireError> {
        if !check_preamble(buf)? {
            return Ok(None);
        }
        let Some(&status) = buf.get(6) else {
            return Ok(None);
        };
        let Some((reason, end)) = short_text(buf, 7)? else {
            return Ok(None);
        };
        match status {
            0 => Ok(Some((Welcome::Accept, end))),
            1 => Ok(Some((Welcome::Refuse(reason), end))),
            _ => Err(WireError::Malformed("welcome")),
        }
    }
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Traces = 1,
    Exposures = 2,
    Evaluations = 3,
    /// A request for the listener's counters (empty payload), answered by
    /// an `Ack` whose payload is a JSON object. Added in the same protocol
    /// version: nothing older than it speaks protocol 1.
    Status = 4,
    Ack = 0x81,
    Nack = 0x82,
}

impl Kind {
    fn from_u8(k: u8) -> Result<Kind, WireError> {
        Ok(match k {
            1 => Kind::Traces,
            2 => Kind::Exposures,
            3 => Kind::Evaluations,
            4 => Kind::Status,
            0x81 => Kind::Ack,
            0x82 => Kind::Nack,
            other => return Err(WireError::UnknownKind(other)),
        })
    }
}

/// One frame, its payload still encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub seq: u64,
    pub payload: Bytes,
}

/// Appends a frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, kind: Kind, seq: u64, payload: &[u8]) {
    encode_frame_prefix(out, kind, seq, payload.len());
    out.extend_from_slice(payload);
}

/// Appends the [`FRAME_PREFIX`] bytes of a frame whose payload, of
/// `payload_len` bytes, is written after them (by the caller).
pub fn encode_frame_prefix(out: &mut Vec<u8>, kind: Kind, seq: u64, payload_len: usize) {
    out.extend_from_slice(&((FRAME_HEAD + payload_len) as u32).to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&seq.to_le_bytes());
}

/// The whole length (prefix included) of the frame at the front of `buf`,
/// once its 4 length bytes are in; an oversized or short length is an
/// error as soon as they are, so a peer cannot make us buffer more than
/// [`MAX_FRAME`].
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if !(FRAME_HEAD..=MAX_FRAME).contains(&len) {
        return Err(WireError::FrameSize(len));
    }
    Ok(Some(4 + len))
}

/// The kind, seq and whole length of the frame at the front of `buf`;
/// `None` while incomplete.
fn frame_head(buf: &[u8]) -> Result<Option<(Kind, u64, usize)>, WireError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let kind = Kind::from_u8(buf[4])?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&buf[5..FRAME_PREFIX]);
    Ok(Some((kind, u64::from_le_bytes(seq), total)))
}

/// The frame at the front of `buf` and its length in bytes; `None` while
/// incomplete. The payload is copied: for small frames (answers).
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    Ok(frame_head(buf)?.map(|(kind, seq, total)| {
        (
            Frame {
                kind,
                seq,
                payload: Bytes::copy_from_slice(&buf[FRAME_PREFIX..total]),
            },
            total,
        )
    }))
}

/// Takes the frame at the front of `buf` off it, its payload a slice of
/// the bytes read (no copy); `None` (and `buf` untouched) while
/// incomplete.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    let Some((kind, seq, total)) = frame_head(buf)? else {
        return Ok(None);
    };
    let mut frame = buf.split_to(total).freeze();
    let payload = frame.split_off(FRAME_PREFIX);
    Ok(Some(Frame { kind, seq, payload }))
}

/// The payload of an `Ack`: the listener's count of un-marked exposure
/// dedup entries ([`crate::exposures::UNMARKED`]).
pub fn ack_payload(unmarked: u64) -> [u8; 8] {
    unmarked.to_le_bytes()
}

/// The count an `Ack` carries, if any (an empty payload carries none).
pub fn ack_unmarked(payload: &[u8]) -> Option<u64> {
    let b: [u8; 8] = payload.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

/// Where a trace body goes, and the headers it is sent with: bodies with
/// the same route are batched together by the listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TraceRoute {
    pub url: String,
    pub lang_version: String,
    pub lang_interpreter: String,
    pub tracer_version: String,
    pub container_id: Option<String>,
}

/// Where EVP events (exposures, evaluation rows) go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EvpRoute {
    pub url: String,
    pub service: String,
    pub env: String,
    pub version: String,
}

impl EvpRoute {
    pub fn new(url: &str, c: &Context) -> EvpRoute {
        EvpRoute {
            url: url.to_owned(),
            service: c.service.clone(),
            env: c.env.clone(),
            version: c.version.clone(),
        }
    }

    pub fn context(&self) -> Context {
        Context {
            service: self.service.clone(),
            env: self.env.clone(),
            version: self.version.clone(),
        }
    }
}

/// A [`Kind::Traces`] payload: one v0.4 body (a msgpack array of traces,
/// as the worker encoded it) and how many traces it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Traces {
    pub route: TraceRoute,
    pub trace_count: u32,
    pub body: Bytes,
}

/// A [`Kind::Exposures`] payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Exposures {
    pub route: EvpRoute,
    pub events: Vec<Exposure>,
}

/// A [`Kind::Evaluations`] payload: aggregated rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluations {
    pub route: EvpRoute,
    pub rows: Vec<Row>,
}

/// Appends primitives (also the layout of a packed
/// [`Exposure`](crate::exposures::Exposure)).
pub(crate) struct Enc<'a>(pub(crate) &'a mut Vec<u8>);

impl Enc<'_> {
    #[inline]
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    #[inline]
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    #[inline]
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    #[inline]
    pub(crate) fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    #[inline]
    fn bytes(&mut self, b: &[u8]) {
        self.0.reserve(4 + b.len());
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    /// A text; one longer than a u32 counts (over 4 GiB: no payload
    /// could hold it anyway) is cut at a character boundary.
    #[inline]
    pub(crate) fn str(&mut self, s: &str) {
        if s.len() <= u32::MAX as usize {
            self.bytes(s.as_bytes());
        } else {
            self.long_str(s);
        }
    }
    #[cold]
    fn long_str(&mut self, s: &str) {
        let mut n = u32::MAX as usize;
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.bytes(&s.as_bytes()[..n]);
    }
    fn opt(&mut self, s: Option<&str>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    fn len(&mut self, n: usize) {
        self.u32(n as u32);
    }
}

/// Reads primitives, every read bounds-checked.
pub(crate) struct Dec<'a> {
    /// What is left to read.
    pub(crate) buf: &'a [u8],
    /// What is being read, for [`WireError::Malformed`].
    pub(crate) what: &'static str,
}

impl<'a> Dec<'a> {
    pub(crate) fn err(&self) -> WireError {
        WireError::Malformed(self.what)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(self.err());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn i64(&mut self) -> Result<i64, WireError> {
        Ok(self.u64()? as i64)
    }
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// A text, borrowed.
    pub(crate) fn text(&mut self) -> Result<&'a str, WireError> {
        let b = self.bytes()?;
        std::str::from_utf8(b).map_err(|_| self.err())
    }
    fn string(&mut self) -> Result<String, WireError> {
        self.text().map(str::to_owned)
    }
    fn opt(&mut self) -> Result<Option<String>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.string().map(Some),
            _ => Err(self.err()),
        }
    }
    /// A count of items each at least `min_size` bytes long: never more
    /// than the bytes left could hold, so a lying count cannot make us
    /// allocate.
    pub(crate) fn len(&mut self, min_size: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size.max(1)) > self.buf.len() {
            return Err(self.err());
        }
        Ok(n)
    }
    fn end(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err())
        }
    }
}

fn put_evp_route(e: &mut Enc<'_>, r: &EvpRoute) {
    e.str(&r.url);
    e.str(&r.service);
    e.str(&r.env);
    e.str(&r.version);
}

fn evp_route(d: &mut Dec<'_>) -> Result<EvpRoute, WireError> {
    Ok(EvpRoute {
        url: d.string()?,
        service: d.string()?,
        env: d.string()?,
        version: d.string()?,
    })
}

impl Traces {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 128);
        Traces::encode_head(&mut out, &self.route, self.trace_count, self.body.len());
        out.extend_from_slice(&self.body);
        out
    }

    /// Appends what comes before the body in a traces payload (route,
    /// count, body length): the payload is these bytes then the body's
    /// `body_len` bytes, so a sender can write the body from where it is.
    pub fn encode_head(out: &mut Vec<u8>, r: &TraceRoute, trace_count: u32, body_len: usize) {
        let mut e = Enc(out);
        e.str(&r.url);
        e.str(&r.lang_version);
        e.str(&r.lang_interpreter);
        e.str(&r.tracer_version);
        e.opt(r.container_id.as_deref());
        e.u32(trace_count);
        e.u32(body_len as u32);
    }

    /// Decodes a payload; the body is a slice of `buf` (no copy).
    pub fn decode(buf: &Bytes) -> Result<Traces, WireError> {
        let mut d = Dec {
            buf,
            what: "traces payload",
        };
        let route = TraceRoute {
            url: d.string()?,
            lang_version: d.string()?,
            lang_interpreter: d.string()?,
            tracer_version: d.string()?,
            container_id: d.opt()?,
        };
        let trace_count = d.u32()?;
        let body = buf.slice_ref(d.bytes()?);
        d.end()?;
        Ok(Traces {
            route,
            trace_count,
            body,
        })
    }
}

impl Exposures {
    pub fn encode(&self) -> Vec<u8> {
        Exposures::encode_events(&self.route, &self.events)
    }

    /// A payload of `events` (each written as it is kept: see
    /// [`Exposure`]), without owning them.
    pub fn encode_events(route: &EvpRoute, events: &[Exposure]) -> Vec<u8> {
        let size: usize = events.iter().map(|x| x.as_bytes().len()).sum();
        let mut out = Vec::with_capacity(size + 256);
        let mut e = Enc(&mut out);
        put_evp_route(&mut e, route);
        e.len(events.len());
        for x in events {
            out.extend_from_slice(x.as_bytes());
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Exposures, WireError> {
        let mut d = Dec {
            buf,
            what: "exposures payload",
        };
        let route = evp_route(&mut d)?;
        let n = d.len(exposures::MIN_SIZE)?;
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(Exposure::take(&mut d).map_err(|_| d.err())?);
        }
        d.end()?;
        Ok(Exposures { route, events })
    }
}

impl Evaluations {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = Enc(&mut out);
        put_evp_route(&mut e, &self.route);
        e.len(self.rows.len());
        for r in &self.rows {
            put_row(&mut e, r);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Evaluations, WireError> {
        let mut d = Dec {
            buf,
            what: "evaluations payload",
        };
        let route = evp_route(&mut d)?;
        let n = d.len(4 + 4 + 4 + 8 * 3 + 1)?;
        let mut rows = Vec::with_capacity(n);
        for _ in 0..n {
            rows.push(row(&mut d)?);
        }
        d.end()?;
        Ok(Evaluations { route, rows })
    }
}

/// The encoded size of one row, for chunking rows into frames.
pub fn row_size(r: &Row) -> usize {
    let opt = |s: &Option<String>| 1 + s.as_ref().map_or(0, |s| 4 + s.len());
    4 + r.key.flag.len()
        + opt(&r.key.variant)
        + opt(&r.key.allocation)
        + opt(&r.key.error)
        + opt(&r.key.targeting_key)
        + 4
        + r.key.context.len()
        + 8 * 3
        + 1
}

fn put_row(e: &mut Enc<'_>, r: &Row) {
    let k = &r.key;
    e.str(&k.flag);
    e.opt(k.variant.as_deref());
    e.opt(k.allocation.as_deref());
    e.opt(k.error.as_deref());
    e.opt(k.targeting_key.as_deref());
    e.bytes(k.context.as_bytes());
    e.i64(r.counts.first);
    e.i64(r.counts.last);
    e.u64(r.counts.count);
    e.u8(match r.tier {
        Tier::Full => 0,
        Tier::Degraded => 1,
    });
}

fn row(d: &mut Dec<'_>) -> Result<Row, WireError> {
    let key = RowKey {
        flag: d.string()?,
        variant: d.opt()?,
        allocation: d.opt()?,
        error: d.opt()?,
        targeting_key: d.opt()?,
        context: Canonical::from_bytes(d.bytes()?.to_vec()),
    };
    let counts = Counts {
        first: d.i64()?,
        last: d.i64()?,
        count: d.u64()?,
    };
    if counts.count == 0 {
        return Err(d.err());
    }
    let tier = match d.u8()? {
        0 => Tier::Full,
        1 => Tier::Degraded,
        _ => return Err(d.err()),
    };
    Ok(Row { key, counts, tier })
}

/// The traces part of a v0.4 body (without its outer array header) and
/// the count that header holds; `None` unless `body` starts with a
/// msgpack array header.
pub fn split_v04_body(body: &[u8]) -> Option<(u32, &[u8])> {
    match *body.first()? {
        b @ 0x90..=0x9f => Some(((b & 0x0f) as u32, &body[1..])),
        0xdc => {
            let n = body.get(1..3)?;
            Some((u16::from_be_bytes([n[0], n[1]]) as u32, &body[3..]))
        }
        0xdd => {
            let n = body.get(1..5)?;
            Some((u32::from_be_bytes([n[0], n[1], n[2], n[3]]), &body[5..]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::AttributeValue;

    fn route() -> EvpRoute {
        EvpRoute {
            url: "http://127.0.0.1:8126".into(),
            service: "svc".into(),
            env: "prod".into(),
            version: "1.2".into(),
        }
    }

    #[test]
    fn handshake_round_trips_and_waits_for_all_its_bytes() {
        let h = Hello::ours("0.1.0");
        let bytes = h.encode();
        for cut in 0..bytes.len() {
            assert_eq!(Hello::decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(Hello::decode(&bytes), Ok(Some((h, bytes.len()))));
        for w in [
            Welcome::Accept,
            Welcome::Refuse("gem 0.2.0 is not 0.1.0".into()),
        ] {
            let b = w.encode();
            assert_eq!(Welcome::decode(&b), Ok(Some((w, b.len()))));
        }
    }

    #[test]
    fn another_version_is_refused_without_reading_further() {
        let mut bytes = Hello::ours("9.9.9").encode();
        bytes[4..6].copy_from_slice(&7u16.to_le_bytes());
        // Whatever follows the version is not looked at.
        bytes.truncate(6);
        bytes.extend_from_slice(&[0xff; 3]);
        assert_eq!(
            Hello::decode(&bytes),
            Err(WireError::Version {
                theirs: 7,
                ours: PROTOCOL_VERSION
            })
        );
        assert_eq!(Hello::decode(b"GET / HTTP/1.1"), Err(WireError::BadMagic));
        assert_eq!(Hello::decode(b"EXS"), Ok(None));
        assert_eq!(Hello::decode(b"EXQ"), Err(WireError::BadMagic));
    }

    #[test]
    fn frames_round_trip_and_wait_for_all_their_bytes() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, Kind::Traces, 7, b"payload");
        encode_frame(&mut buf, Kind::Ack, 7, b"");
        let (f, n) = decode_frame(&buf).unwrap().unwrap();
        assert_eq!(
            (f.kind, f.seq, &f.payload[..]),
            (Kind::Traces, 7, &b"payload"[..])
        );
        let (g, m) = decode_frame(&buf[n..]).unwrap().unwrap();
        assert_eq!((g.kind, g.seq, g.payload.len()), (Kind::Ack, 7, 0));
        assert_eq!(n + m, buf.len());
        for cut in 0..n {
            assert_eq!(decode_frame(&buf[..cut]), Ok(None));
        }
    }

    #[test]
    fn frames_are_taken_off_a_read_buffer_as_slices_of_it() {
        let t = Traces {
            route: TraceRoute {
                url: "http://a".into(),
                ..Default::default()
            },
            trace_count: 1,
            body: Bytes::from_static(&[0x91, 0x90]),
        };
        // The head then the body, written apart, are the payload encode makes.
        let mut parts = Vec::new();
        Traces::encode_head(&mut parts, &t.route, 1, t.body.len());
        parts.extend_from_slice(&t.body);
        assert_eq!(parts, t.encode());
        let mut raw = Vec::new();
        encode_frame(&mut raw, Kind::Traces, 3, &t.encode());
        let mut prefixed = Vec::new();
        encode_frame_prefix(&mut prefixed, Kind::Ack, 4, 0);
        raw.extend_from_slice(&prefixed);
        let mut buf = BytesMut::from(&raw[..raw.len() - 1]);
        let start = buf.as_ptr() as usize;
        let f = take_frame(&mut buf).unwrap().unwrap();
        assert_eq!((f.kind, f.seq), (Kind::Traces, 3));
        assert_eq!(f.payload.as_ptr() as usize, start + FRAME_PREFIX, "no copy");
        let got = Traces::decode(&f.payload).unwrap();
        assert_eq!(got, t);
        assert!(got.body.as_ptr() >= f.payload.as_ptr(), "no copy");
        // The Ack is one byte short: left where it is.
        assert_eq!(take_frame(&mut buf), Ok(None));
        assert_eq!(buf.len(), FRAME_PREFIX - 1);
        buf.extend_from_slice(&raw[raw.len() - 1..]);
        let g = take_frame(&mut buf).unwrap().unwrap();
        assert_eq!((g.kind, g.seq, g.payload.len()), (Kind::Ack, 4, 0));
        assert!(buf.is_empty());
        assert_eq!(frame_len(&raw), Ok(Some(raw.len() - FRAME_PREFIX)));
    }

    #[test]
    fn oversized_short_and_unknown_frames_are_errors() {
        let big = ((MAX_FRAME + 1) as u32).to_le_bytes();
        // Refused from its length alone: nothing is buffered for it.
        assert_eq!(decode_frame(&big), Err(WireError::FrameSize(MAX_FRAME + 1)));
        assert_eq!(
            decode_frame(&3u32.to_le_bytes()),
            Err(WireError::FrameSize(3))
        );
        let mut buf = Vec::new();
        encode_frame(&mut buf, Kind::Ack, 1, b"");
        buf[4] = 0x55;
        assert_eq!(decode_frame(&buf), Err(WireError::UnknownKind(0x55)));
    }

    #[test]
    fn payloads_round_trip() {
        let t = Traces {
            route: TraceRoute {
                url: "unix:///tmp/apm.sock".into(),
                lang_version: "3.1.2".into(),
                lang_interpreter: "ruby".into(),
                tracer_version: "0.1.0".into(),
                container_id: Some("abc".into()),
            },
            trace_count: 2,
            body: Bytes::from_static(&[0x92, 0x90, 0x90]),
        };
        assert_eq!(Traces::decode(&Bytes::from(t.encode())), Ok(t));

        let x = Exposures {
            route: route(),
            events: vec![exposures::sample_exposure(), exposures::sample_exposure()],
        };
        assert_eq!(Exposures::decode(&x.encode()), Ok(x));

        let key = RowKey {
            flag: "f".into(),
            variant: None,
            allocation: Some("a".into()),
            error: Some("FLAG_NOT_FOUND".into()),
            targeting_key: Some("sha256_00".into()),
            context: Canonical::from_bytes(vec![1, 2, 3]),
        };
        let row = Row {
            key,
            counts: Counts {
                first: 1,
                last: 9,
                count: 4,
            },
            tier: Tier::Degraded,
        };
        assert_eq!(row_size(&row), {
            let mut b = Vec::new();
            put_row(&mut Enc(&mut b), &row);
            b.len()
        });
        let e = Evaluations {
            route: route(),
            rows: vec![row],
        };
        assert_eq!(Evaluations::decode(&e.encode()), Ok(e));
    }

    #[test]
    fn truncated_or_garbage_payloads_are_malformed_never_a_panic() {
        let x = Exposures {
            route: route(),
            events: vec![Exposure::new(
                1,
                "f",
                "a",
                "v",
                "s",
                &[("k".into(), AttributeValue::String("v".into()))],
            )],
        }
        .encode();
        for cut in 0..x.len() {
            assert!(Exposures::decode(&x[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = x.clone();
        trailing.push(0);
        assert!(Exposures::decode(&trailing).is_err());
        // A count claiming more items than the bytes could hold.
        let mut lying = Vec::new();
        put_evp_route(&mut Enc(&mut lying), &route());
        lying.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Exposures::decode(&lying).is_err());
        assert!(Evaluations::decode(&lying).is_err());
        // Seeded garbage of every length.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2_000 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = Traces::decode(&Bytes::from(bytes.clone()));
            let _ = Exposures::decode(&bytes);
            let _ = Evaluations::decode(&bytes);
            let _ = decode_frame(&bytes);
            let _ = Hello::decode(&bytes);
        }
    }

    #[test]
    fn v04_bodies_split_at_their_array_header() {
        assert_eq!(split_v04_body(&[0x92, 1, 2]), Some((2, &[1u8, 2][..])));
        assert_eq!(split_v04_body(&[0xdc, 0, 3, 9]), Some((3, &[9u8][..])));
        assert_eq!(
            split_v04_body(&[0xdd, 0, 0, 0, 1, 9]),
            Some((1, &[9u8][..]))
        );
        assert_eq!(split_v04_body(&[0xdd, 0]), None);
        assert_eq!(split_v04_body(&[0x80]), None);
        assert_eq!(split_v04_body(&[]), None);
    }
}
