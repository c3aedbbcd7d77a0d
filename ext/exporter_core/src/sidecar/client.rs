//! The client end of a sidecar connection, in a worker process.
//!
//! It owns one connected Unix stream (in thread mode the socketpair end
//! inherited through fork) and hands payloads over one at a time:
//! handshake on first use, then a frame, then wait for the `Ack` or `Nack`
//! of its seq. Every wait is bounded ([`HANDOVER_TIMEOUT`]). The flushers
//! of the batch workers call it (through [`super::sink`]); what it could
//! not hand over they send direct.
//!
//! States: fresh (no handshake yet), ready, or broken for good (refused,
//! closed, garbage, or a frame only partly written, after which the
//! stream cannot be trusted). An `Ack` that does not come in time leaves
//! the connection usable: a late one is recognised by its seq and skipped.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::wire::{self, Hello, Kind, Welcome, WireError};
use super::COUNTERS;
use crate::log::ProblemLog;

/// How long a handover may wait for its answer (and a write for room).
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a payload was not handed over (the caller sends it direct).
#[derive(Debug)]
pub enum HandoverError {
    /// The connection was unusable before this handover.
    Broken(String),
    /// The listener refused the handshake.
    Refused(String),
    /// The listener would not take this payload (full, bad route).
    Nack(String),
    /// No answer in time; the listener may still take it (then the direct
    /// send duplicates it: at least once).
    Timeout,
    Io(std::io::Error),
    Protocol(WireError),
    /// The payload alone is larger than a frame may be.
    TooLarge(usize),
}

impl std::fmt::Display for HandoverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandoverError::Broken(why) => write!(f, "sidecar connection unusable: {why}"),
            HandoverError::Refused(why) => write!(f, "sidecar refused the connection: {why}"),
            HandoverError::Nack(why) => write!(f, "sidecar refused a payload: {why}"),
            HandoverError::Timeout => write!(
                f,
                "sidecar did not answer within {} s",
                HANDOVER_TIMEOUT.as_secs_f64()
            ),
            HandoverError::Io(e) => write!(f, "sidecar connection: {e}"),
            HandoverError::Protocol(e) => write!(f, "sidecar protocol: {e}"),
            HandoverError::TooLarge(n) => write!(f, "payload of {n} bytes exceeds a frame"),
        }
    }
}

enum State {
    Fresh,
    /// Hello sent, welcome not read yet.
    Greeting,
    Ready,
    Broken(String),
}

struct Conn {
    /// `None` in a client made unavailable from the start.
    stream: Option<UnixStream>,
    state: State,
    seq: u64,
    inbuf: Vec<u8>,
    /// The frame prefix (and any payload head) of the frame being
    /// written, reused.
    head: Vec<u8>,
    /// A payload buffer kept between handovers ([`Client::take_spare`]).
    spare: Vec<u8>,
}

impl Conn {
    fn new(stream: Option<UnixStream>, state: State) -> Conn {
        Conn {
            stream,
            state,
            seq: 0,
            inbuf: Vec::new(),
            head: Vec::new(),
            spare: Vec::new(),
        }
    }
}

/// A connection to a listener.
pub struct Client {
    conn: Mutex<Conn>,
    gem_version: String,
    log: ProblemLog,
}

impl Client {
    pub fn new(stream: UnixStream, gem_version: &str) -> Client {
        Client {
            conn: Mutex::new(Conn::new(Some(stream), State::Fresh)),
            gem_version: gem_version.to_owned(),
            log: ProblemLog::new("sidecar client"),
        }
    }

    /// A client with no connection: every handover fails at once with
    /// `Broken(why)` (the caller sends direct, counted). Subprocess mode
    /// uses it while no helper can be reached.
    pub fn unavailable(why: &str, gem_version: &str) -> Client {
        Client {
            conn: Mutex::new(Conn::new(None, State::Broken(why.to_owned()))),
            gem_version: gem_version.to_owned(),
            log: ProblemLog::new("sidecar client"),
        }
    }

    /// Why the connection is broken for good, if it is.
    pub fn broken_reason(&self) -> Option<String> {
        match &self.conn().state {
            State::Broken(why) => Some(why.clone()),
            _ => None,
        }
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the connection is broken for good.
    pub fn is_broken(&self) -> bool {
        matches!(self.conn().state, State::Broken(_))
    }

    /// Hands `payload` over as a frame of `kind`; Ok once the listener
    /// acknowledged it (it holds it now). Blocks, bounded: call it from a
    /// flusher, through [`blocking`].
    pub fn handover(&self, kind: Kind, payload: &[u8]) -> Result<(), HandoverError> {
        self.handover_parts(kind, &[], payload)
    }

    /// As [`Client::handover`] with the payload `head` then `body`, both
    /// written from where they are (one vectored write, no copy of the
    /// body).
    pub fn handover_parts(
        &self,
        kind: Kind,
        head: &[u8],
        body: &[u8],
    ) -> Result<(), HandoverError> {
        let len = head.len() + body.len();
        if wire::MAX_FRAME < len + 9 {
            return Err(HandoverError::TooLarge(len));
        }
        let mut c = self.conn();
        let result = self.handover_locked(&mut c, kind, head, body);
        match &result {
            Ok(()) => {
                COUNTERS.frames_acknowledged.fetch_add(1, Ordering::Relaxed);
                self.log.outcome(None);
            }
            Err(e) => {
                match e {
                    HandoverError::Nack(_) => &COUNTERS.frames_nacked,
                    HandoverError::Timeout => &COUNTERS.frames_timed_out,
                    _ => &COUNTERS.frames_failed,
                }
                .fetch_add(1, Ordering::Relaxed);
                // Only fatal errors mark the connection broken; the rest
                // leave it usable for the next handover.
                let fatal = matches!(
                    e,
                    HandoverError::Io(_) | HandoverError::Protocol(_) | HandoverError::Refused(_)
                );
                if fatal {
                    c.state = State::Broken(e.to_string());
                    if let Some(s) = &c.stream {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                }
                if !matches!(e, HandoverError::Broken(_)) {
                    self.log.outcome(Some(&format!(
                        "{e}; sending direct (counted in the sidecar's *_direct)"
                    )));
                }
            }
        }
        result
    }

    /// Asks the listener for its status (a JSON object of its counters):
    /// a [`Kind::Status`] frame, answered by an `Ack` carrying it. Not
    /// counted as a handover.
    pub fn status(&self) -> Result<Vec<u8>, HandoverError> {
        let mut c = self.conn();
        self.exchange(&mut c, Kind::Status, b"", b"")
            .map(|p| p.to_vec())
    }

    /// A buffer to encode a payload into (the one given back last by
    /// [`Client::keep_spare`], else an empty one).
    pub fn take_spare(&self) -> Vec<u8> {
        std::mem::take(&mut self.conn().spare)
    }

    /// Keeps `buf` for the next [`Client::take_spare`].
    pub fn keep_spare(&self, buf: Vec<u8>) {
        let mut c = self.conn();
        if buf.capacity() > c.spare.capacity() && buf.capacity() <= wire::MAX_FRAME {
            c.spare = buf;
        }
    }

    fn handover_locked(
        &self,
        c: &mut Conn,
        kind: Kind,
        head: &[u8],
        body: &[u8],
    ) -> Result<(), HandoverError> {
        self.exchange(c, kind, head, body).map(|_| ())
    }

    /// Sends one frame (greeting first if needed), its payload `head` then
    /// `body`, and returns the payload of the `Ack` for it.
    fn exchange(
        &self,
        c: &mut Conn,
        kind: Kind,
        head: &[u8],
        body: &[u8],
    ) -> Result<bytes::Bytes, HandoverError> {
        let deadline = Instant::now() + HANDOVER_TIMEOUT;
        if let State::Broken(why) = &c.state {
            return Err(HandoverError::Broken(why.clone()));
        }
        let Some(mut stream) = c.stream.take() else {
            return Err(HandoverError::Broken("no connection".into()));
        };
        let result = exchange_on(
            &mut stream,
            c,
            &self.gem_version,
            kind,
            (head, body),
            deadline,
        );
        c.stream = Some(stream);
        result
    }
}

fn exchange_on(
    stream: &mut UnixStream,
    c: &mut Conn,
    gem_version: &str,
    kind: Kind,
    (head, body): (&[u8], &[u8]),
    deadline: Instant,
) -> Result<bytes::Bytes, HandoverError> {
    if matches!(c.state, State::Fresh | State::Greeting) {
        if matches!(c.state, State::Fresh) {
            write_all(stream, &Hello::ours(gem_version).encode(), deadline)?;
            c.state = State::Greeting;
        }
        match read_until(stream, c, deadline, Welcome::decode)? {
            Welcome::Accept => c.state = State::Ready,
            Welcome::Refuse(why) => return Err(HandoverError::Refused(why)),
        }
    }
    c.seq += 1;
    let seq = c.seq;
    let mut prefix = std::mem::take(&mut c.head);
    prefix.clear();
    wire::encode_frame_prefix(&mut prefix, kind, seq, head.len() + body.len());
    prefix.extend_from_slice(head);
    let written = write_all_parts(stream, &prefix, body, deadline);
    c.head = prefix;
    written?;
    loop {
        let reply = read_until(stream, c, deadline, wire::decode_frame)?;
        if reply.seq < seq {
            // The late answer to a handover that timed out.
            continue;
        }
        if reply.seq > seq {
            return Err(HandoverError::Protocol(WireError::Malformed("reply seq")));
        }
        return match reply.kind {
            Kind::Ack => {
                // Exposures the listener un-marked: this process forgets
                // its own marks at its next record. (A status reply is
                // JSON, never this count.)
                if kind != Kind::Status {
                    if let Some(n) = wire::ack_unmarked(&reply.payload) {
                        crate::exposures::LISTENER_UNMARKED.store(n, Ordering::Release);
                    }
                }
                Ok(reply.payload)
            }
            Kind::Nack => Err(HandoverError::Nack(
                String::from_utf8_lossy(&reply.payload).into_owned(),
            )),
            _ => Err(HandoverError::Protocol(WireError::Malformed("reply kind"))),
        };
    }
}

/// Writes all of `bytes` by `deadline`. Running out of time part-way is
/// an I/O error (the stream is then out of step), before any byte a
/// timeout.
fn write_all(
    stream: &mut UnixStream,
    bytes: &[u8],
    deadline: Instant,
) -> Result<(), HandoverError> {
    write_all_parts(stream, bytes, &[], deadline)
}

/// As [`write_all`] for `first` then `second`, with vectored writes.
fn write_all_parts(
    stream: &mut UnixStream,
    first: &[u8],
    second: &[u8],
    deadline: Instant,
) -> Result<(), HandoverError> {
    let total = first.len() + second.len();
    let mut written = 0;
    while written < total {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(if written == 0 {
                HandoverError::Timeout
            } else {
                HandoverError::Io(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "frame only partly written in time",
                ))
            });
        }
        stream
            .set_write_timeout(Some(left))
            .map_err(HandoverError::Io)?;
        let r = if written < first.len() {
            stream.write_vectored(&[IoSlice::new(&first[written..]), IoSlice::new(second)])
        } else {
            stream.write(&second[written - first.len()..])
        };
        match r {
            Ok(0) => {
                return Err(HandoverError::Io(ErrorKind::WriteZero.into()));
            }
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(HandoverError::Io(e)),
        }
    }
    Ok(())
}

/// Decodes a message at the front of a buffer: `None` while incomplete,
/// else the message and its length.
type Decoder<T> = fn(&[u8]) -> Result<Option<(T, usize)>, WireError>;

/// Reads until `decode` finds a whole message at the front of the input
/// buffer (consumed), by `deadline`.
fn read_until<T>(
    stream: &mut UnixStream,
    c: &mut Conn,
    deadline: Instant,
    decode: Decoder<T>,
) -> Result<T, HandoverError> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((value, used)) = decode(&c.inbuf).map_err(HandoverError::Protocol)? {
            c.inbuf.drain(..used);
            return Ok(value);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandoverError::Timeout);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(HandoverError::Io)?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(HandoverError::Io(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the listener closed the connection",
                )))
            }
            Ok(n) => c.inbuf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(HandoverError::Io(e)),
        }
    }
}

/// Runs a blocking handover from async code: on a multi-thread runtime the
/// worker thread is handed to the other tasks meanwhile.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

static CURRENT: Mutex<Option<Arc<Client>>> = Mutex::new(None);

/// The client of this process, if it is a sidecar client.
pub fn current() -> Option<Arc<Client>> {
    CURRENT.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Installs (or with `None` removes) this process's client.
pub(crate) fn set(client: Option<Arc<Client>>) {
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = client;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake listener on the other end answering from a script.
    fn answer(
        mut peer: UnixStream,
        welcome: Welcome,
        replies: Vec<Kind>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut greeted = false;
            let mut replies = replies.into_iter();
            loop {
                if !greeted {
                    if let Ok(Some((_, n))) = Hello::decode(&buf) {
                        buf.drain(..n);
                        peer.write_all(&welcome.encode()).unwrap();
                        greeted = true;
                        if welcome != Welcome::Accept {
                            return;
                        }
                        continue;
                    }
                } else if let Ok(Some((f, n))) = wire::decode_frame(&buf) {
                    buf.drain(..n);
                    let Some(kind) = replies.next() else { return };
                    let mut out = Vec::new();
                    wire::encode_frame(&mut out, kind, f.seq, b"full");
                    peer.write_all(&out).unwrap();
                    continue;
                }
                match peer.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
    }

    #[test]
    fn acks_nacks_and_refusals() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = answer(b, Welcome::Accept, vec![Kind::Ack, Kind::Nack, Kind::Ack]);
        let c = Client::new(a, "0.1.0");
        assert!(c.handover(Kind::Traces, b"x").is_ok());
        assert!(
            matches!(c.handover(Kind::Traces, b"y"), Err(HandoverError::Nack(r)) if r == "full")
        );
        assert!(
            c.handover(Kind::Traces, b"z").is_ok(),
            "a Nack leaves it usable"
        );
        drop(c);
        t.join().unwrap();

        let (a, b) = UnixStream::pair().unwrap();
        let t = answer(b, Welcome::Refuse("protocol 2".into()), vec![]);
        let c = Client::new(a, "0.1.0");
        assert!(matches!(
            c.handover(Kind::Traces, b"x"),
            Err(HandoverError::Refused(_))
        ));
        assert!(c.is_broken());
        assert!(matches!(
            c.handover(Kind::Traces, b"x"),
            Err(HandoverError::Broken(_))
        ));
        t.join().unwrap();
    }

    #[test]
    fn a_payload_in_two_parts_is_the_same_frame_on_the_wire() {
        let (a, mut b) = UnixStream::pair().unwrap();
        // Larger than the socket buffer: written in several vectored writes.
        let body: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let head = b"route-and-count".to_vec();
        let expected = {
            let mut payload = head.clone();
            payload.extend_from_slice(&body);
            let mut out = Hello::ours("0.1.0").encode();
            wire::encode_frame(&mut out, Kind::Traces, 1, &payload);
            out
        };
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut chunk = [0u8; 65536];
            let mut greeted = false;
            loop {
                if !greeted && Hello::decode(&got).ok().flatten().is_some() {
                    b.write_all(&Welcome::Accept.encode()).unwrap();
                    greeted = true;
                }
                if greeted {
                    let hello = Hello::ours("0.1.0").encode().len();
                    if let Ok(Some((f, _))) = wire::decode_frame(&got[hello..]) {
                        let mut out = Vec::new();
                        wire::encode_frame(&mut out, Kind::Ack, f.seq, b"");
                        b.write_all(&out).unwrap();
                        return got;
                    }
                }
                let n = b.read(&mut chunk).unwrap();
                assert!(n > 0);
                got.extend_from_slice(&chunk[..n]);
            }
        });
        let c = Client::new(a, "0.1.0");
        c.handover_parts(Kind::Traces, &head, &body).unwrap();
        assert_eq!(reader.join().unwrap(), expected);
    }

    #[test]
    fn a_silent_listener_times_out_and_a_closed_one_breaks() {
        let (a, b) = UnixStream::pair().unwrap();
        let c = Client::new(a, "0.1.0");
        let started = Instant::now();
        assert!(matches!(
            c.handover(Kind::Traces, b"x"),
            Err(HandoverError::Timeout)
        ));
        assert!(started.elapsed() < HANDOVER_TIMEOUT * 2);
        drop(b);
        assert!(matches!(
            c.handover(Kind::Traces, b"x"),
            Err(HandoverError::Io(_))
        ));
        assert!(c.is_broken());
    }
}
