//! The client end of a sidecar connection, in a worker process.
//!
//! It owns one connected Unix stream (in thread mode the socketpair end
//! inherited through fork) and hands payloads over one at a time:
//! handshake on first use, then a frame, then wait for the `Ack` or `Nack`
//! of its seq. Every wait is bounded ([`HANDOVER_TIMEOUT`]). The flushers
//! of the batch workers call it (through [`super::sink`]); what it could
//! not hand over they send direct.
//!
//! The stream is non-blocking. A handover first tries each write and read
//! at once (a frame usually fits in the socket's buffer in one write);
//! only when the socket is not ready does it wait: as a task of the
//! runtime ([`Client::handover_parts_async`], the flushers' path: the fd
//! is registered with the runtime's reactor for that handover only, so no
//! thread is handed the runtime meanwhile and no registration outlives a
//! runtime across fork), or parked in `poll(2)` ([`Client::handover`],
//! [`Client::status`]: sync callers and tests). One protocol code serves
//! both.
//!
//! States: fresh (no handshake yet), greeting (hello sent), ready, or
//! broken for good (refused, closed, garbage, or a frame only partly
//! written, after which the stream cannot be trusted). An `Ack` that does
//! not come in time leaves the connection usable: a late one is
//! recognised by its seq and skipped. An async handover dropped at an
//! await (runtime shutdown before fork) leaves the same states behind: a
//! frame cut off part-way has already marked the connection broken.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::wire::{self, Hello, Kind, Welcome, WireError};
use super::COUNTERS;
use crate::log::ProblemLog;

/// How long a handover may wait for its answer (and a write for room).
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// The wait once the process is exiting ([`exiting`]): short enough that
/// what the listener did not take can still go direct within the exit
/// flush's budget (5 s). A listener that does not answer within it is
/// paused (its master forking: Puma runs its whole graceful stop from a
/// trap handler that may land mid-fork) or gone.
pub const EXIT_HANDOVER_TIMEOUT: Duration = Duration::from_secs(2);

static EXITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks the process as exiting: later handovers wait at most
/// [`EXIT_HANDOVER_TIMEOUT`].
pub fn exiting() {
    EXITING.store(true, Ordering::Relaxed);
}

/// How long a handover started now may wait.
pub fn handover_timeout() -> Duration {
    if EXITING.load(Ordering::Relaxed) {
        EXIT_HANDOVER_TIMEOUT
    } else {
        HANDOVER_TIMEOUT
    }
}

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
    /// The socket could not be waited on (no runtime to register it
    /// with); the connection itself is still usable.
    Wait(std::io::Error),
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
                handover_timeout().as_secs_f64()
            ),
            HandoverError::Io(e) => write!(f, "sidecar connection: {e}"),
            HandoverError::Wait(e) => write!(f, "cannot wait on the sidecar connection: {e}"),
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

/// What an exchange changes, apart from the stream it runs on.
struct Session {
    state: State,
    seq: u64,
    inbuf: Vec<u8>,
    /// The frame prefix (and any payload head) of the frame being
    /// written, reused.
    head: Vec<u8>,
}

struct Conn {
    /// `None` in a client made unavailable from the start.
    stream: Option<UnixStream>,
    session: Session,
}

impl Conn {
    fn new(stream: Option<UnixStream>, state: State) -> Conn {
        Conn {
            stream,
            session: Session {
                state,
                seq: 0,
                inbuf: Vec::new(),
                head: Vec::new(),
            },
        }
    }
}

/// A connection to a listener.
pub struct Client {
    /// An async lock: a handover holds it across its waits, and other
    /// tasks of the runtime wait for it without blocking the runtime.
    conn: tokio::sync::Mutex<Conn>,
    /// A payload buffer kept between handovers ([`Client::take_spare`]).
    spare: Mutex<Vec<u8>>,
    gem_version: String,
    log: ProblemLog,
}

impl Client {
    pub fn new(stream: UnixStream, gem_version: &str) -> Client {
        let conn = match stream.set_nonblocking(true) {
            Ok(()) => Conn::new(Some(stream), State::Fresh),
            Err(e) => Conn::new(
                None,
                State::Broken(format!("cannot make it non-blocking: {e}")),
            ),
        };
        Client {
            conn: tokio::sync::Mutex::new(conn),
            spare: Mutex::new(Vec::new()),
            gem_version: gem_version.to_owned(),
            log: ProblemLog::new("sidecar client"),
        }
    }

    /// A client with no connection: every handover fails at once with
    /// `Broken(why)` (the caller sends direct, counted). Subprocess mode
    /// uses it while no helper can be reached.
    pub fn unavailable(why: &str, gem_version: &str) -> Client {
        Client {
            conn: tokio::sync::Mutex::new(Conn::new(None, State::Broken(why.to_owned()))),
            spare: Mutex::new(Vec::new()),
            gem_version: gem_version.to_owned(),
            log: ProblemLog::new("sidecar client"),
        }
    }

    /// Why the connection is broken for good, if it is. A connection
    /// with a handover in progress counts as not broken (that handover
    /// tells).
    pub fn broken_reason(&self) -> Option<String> {
        match &self.conn.try_lock().ok()?.session.state {
            State::Broken(why) => Some(why.clone()),
            _ => None,
        }
    }

    /// Whether the connection is broken for good (never waits).
    pub fn is_broken(&self) -> bool {
        self.conn
            .try_lock()
            .is_ok_and(|c| matches!(c.session.state, State::Broken(_)))
    }

    /// Hands `payload` over as a frame of `kind`; Ok once the listener
    /// acknowledged it (it holds it now). Blocks the calling thread,
    /// bounded: for sync callers, never from a task of the runtime (use
    /// [`Client::handover_async`] there).
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
        crate::block_on::block_on(self.handover_with(Waiter::Blocking, kind, head, body))
    }

    /// As [`Client::handover`], as a task of the runtime: the waits for
    /// the socket are the reactor's.
    pub async fn handover_async(&self, kind: Kind, payload: &[u8]) -> Result<(), HandoverError> {
        self.handover_parts_async(kind, &[], payload).await
    }

    /// As [`Client::handover_parts`], as a task of the runtime.
    pub async fn handover_parts_async(
        &self,
        kind: Kind,
        head: &[u8],
        body: &[u8],
    ) -> Result<(), HandoverError> {
        self.handover_with(Waiter::Async(None), kind, head, body)
            .await
    }

    async fn handover_with(
        &self,
        waiter: Waiter<'_>,
        kind: Kind,
        head: &[u8],
        body: &[u8],
    ) -> Result<(), HandoverError> {
        let len = head.len() + body.len();
        if wire::MAX_FRAME < len + 9 {
            return Err(HandoverError::TooLarge(len));
        }
        let mut c = self.conn.lock().await;
        let result = self.exchange(&mut c, waiter, kind, head, body).await;
        match &result {
            Ok(_) => {
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
                    c.session.state = State::Broken(e.to_string());
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
        result.map(|_| ())
    }

    /// Asks the listener for its status (a JSON object of its counters):
    /// a [`Kind::Status`] frame, answered by an `Ack` carrying it. Not
    /// counted as a handover. Blocks, bounded (sync callers).
    pub fn status(&self) -> Result<Vec<u8>, HandoverError> {
        crate::block_on::block_on(async {
            let mut c = self.conn.lock().await;
            self.exchange(&mut c, Waiter::Blocking, Kind::Status, b"", b"")
                .await
                .map(|p| p.to_vec())
        })
    }

    /// A buffer to encode a payload into (the one given back last by
    /// [`Client::keep_spare`], else an empty one).
    pub fn take_spare(&self) -> Vec<u8> {
        std::mem::take(&mut *self.spare())
    }

    /// Keeps `buf` for the next [`Client::take_spare`].
    pub fn keep_spare(&self, buf: Vec<u8>) {
        let mut spare = self.spare();
        if buf.capacity() > spare.capacity() && buf.capacity() <= wire::MAX_FRAME {
            *spare = buf;
        }
    }

    fn spare(&self) -> MutexGuard<'_, Vec<u8>> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends one frame (greeting first if needed), its payload `head` then
    /// `body`, and returns the payload of the `Ack` for it.
    async fn exchange(
        &self,
        c: &mut Conn,
        waiter: Waiter<'_>,
        kind: Kind,
        head: &[u8],
        body: &[u8],
    ) -> Result<bytes::Bytes, HandoverError> {
        let deadline = Instant::now() + handover_timeout();
        if let State::Broken(why) = &c.session.state {
            return Err(HandoverError::Broken(why.clone()));
        }
        let Conn { stream, session } = c;
        let Some(stream) = stream.as_ref() else {
            return Err(HandoverError::Broken("no connection".into()));
        };
        let mut io = SocketIo {
            stream,
            waiter,
            deadline,
        };
        io.exchange(session, &self.gem_version, kind, (head, body))
            .await
    }
}

/// How an exchange waits for its socket (`'a`: the stream's borrow).
enum Waiter<'a> {
    /// Parked in `poll(2)`.
    Blocking,
    /// As a task of the runtime; registered with its reactor at the first
    /// wait, deregistered when the exchange ends (or is dropped).
    Async(Option<AsyncFd<BorrowedFd<'a>>>),
}

/// A wait for the socket to become readable or writable.
#[derive(Clone, Copy)]
enum Ready {
    Read,
    Write,
}

/// One exchange's view of the stream: non-blocking attempts, and waits
/// bounded by `deadline`.
struct SocketIo<'a> {
    stream: &'a UnixStream,
    waiter: Waiter<'a>,
    deadline: Instant,
}

impl SocketIo<'_> {
    async fn exchange(
        &mut self,
        s: &mut Session,
        gem_version: &str,
        kind: Kind,
        (head, body): (&[u8], &[u8]),
    ) -> Result<bytes::Bytes, HandoverError> {
        if matches!(s.state, State::Fresh | State::Greeting) {
            if matches!(s.state, State::Fresh) {
                self.write_all_parts(s, &Hello::ours(gem_version).encode(), &[])
                    .await?;
                s.state = State::Greeting;
            }
            match self.read_until(s, Welcome::decode).await? {
                Welcome::Accept => s.state = State::Ready,
                Welcome::Refuse(why) => return Err(HandoverError::Refused(why)),
            }
        }
        s.seq += 1;
        let seq = s.seq;
        let mut prefix = std::mem::take(&mut s.head);
        prefix.clear();
        wire::encode_frame_prefix(&mut prefix, kind, seq, head.len() + body.len());
        prefix.extend_from_slice(head);
        let written = self.write_all_parts(s, &prefix, body).await;
        s.head = prefix;
        written?;
        loop {
            let reply = self.read_until(s, wire::decode_frame).await?;
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

    /// Writes all of `first` then `second` (vectored writes) by the
    /// deadline. Any failure part-way is an I/O error (the stream is then
    /// out of step: fatal), before any byte the failure itself (running
    /// out of time is then a timeout). While a message is only partly
    /// written the session is marked broken, so an exchange dropped there
    /// leaves it so.
    async fn write_all_parts(
        &mut self,
        s: &mut Session,
        first: &[u8],
        second: &[u8],
    ) -> Result<(), HandoverError> {
        let total = first.len() + second.len();
        let mut written = 0;
        // The state to restore once the message is whole.
        let mut before: Option<State> = None;
        let result = loop {
            if written == total {
                break Ok(());
            }
            let r = if written < first.len() {
                self.stream
                    .write_vectored(&[IoSlice::new(&first[written..]), IoSlice::new(second)])
            } else {
                self.stream.write(&second[written - first.len()..])
            };
            match r {
                Ok(0) => break Err(HandoverError::Io(ErrorKind::WriteZero.into())),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if written > 0 && before.is_none() {
                        let cut = State::Broken("a message was cut off part-way".into());
                        before = Some(std::mem::replace(&mut s.state, cut));
                    }
                    if let Err(e) = self.wait(Ready::Write).await {
                        break Err(e);
                    }
                }
                Err(e) => break Err(HandoverError::Io(e)),
            }
        };
        match result {
            Ok(()) => {
                if let Some(state) = before {
                    s.state = state;
                }
                Ok(())
            }
            Err(HandoverError::Timeout) if written > 0 => Err(HandoverError::Io(
                std::io::Error::new(ErrorKind::TimedOut, "frame only partly written in time"),
            )),
            Err(HandoverError::Wait(e)) if written > 0 => Err(HandoverError::Io(e)),
            Err(e) => Err(e),
        }
    }

    /// Reads until `decode` finds a whole message at the front of the
    /// input buffer (consumed), by the deadline.
    async fn read_until<T>(
        &mut self,
        s: &mut Session,
        decode: Decoder<T>,
    ) -> Result<T, HandoverError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((value, used)) = decode(&s.inbuf).map_err(HandoverError::Protocol)? {
                s.inbuf.drain(..used);
                return Ok(value);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(HandoverError::Io(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the listener closed the connection",
                    )))
                }
                Ok(n) => s.inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.wait(Ready::Read).await?,
                Err(e) => return Err(HandoverError::Io(e)),
            }
        }
    }

    /// Waits until the socket may be ready (the caller tries again and
    /// comes back on `WouldBlock`): `Timeout` once the deadline passed.
    async fn wait(&mut self, ready: Ready) -> Result<(), HandoverError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandoverError::Timeout);
        }
        let stream: &UnixStream = self.stream;
        match &mut self.waiter {
            Waiter::Blocking => poll_fd(stream.as_raw_fd(), ready, left).map_err(HandoverError::Io),
            Waiter::Async(registered) => {
                let afd = match registered {
                    Some(afd) => afd,
                    None => {
                        // (AsyncFd panics outside a runtime: checked first.)
                        tokio::runtime::Handle::try_current()
                            .map_err(|e| HandoverError::Wait(std::io::Error::other(e)))?;
                        let interest = Interest::READABLE | Interest::WRITABLE;
                        // SAFETY: the fd is borrowed from the stream for
                        // as long as the registration lives.
                        let afd =
                            unsafe { AsyncFd::register_with_interest(stream.as_fd(), interest) }
                                .map_err(|e| HandoverError::Wait(e.into_parts().1))?;
                        registered.insert(afd)
                    }
                };
                let deadline = tokio::time::Instant::from_std(self.deadline);
                let waited = match ready {
                    Ready::Read => tokio::time::timeout_at(deadline, afd.readable()).await,
                    Ready::Write => tokio::time::timeout_at(deadline, afd.writable()).await,
                };
                match waited {
                    Err(_elapsed) => Err(HandoverError::Timeout),
                    // Cleared now, tried next: an edge that comes after
                    // this guard was taken is kept (tokio's readiness
                    // ticks), so none is lost.
                    Ok(Ok(mut guard)) => {
                        guard.clear_ready();
                        Ok(())
                    }
                    Ok(Err(e)) => Err(HandoverError::Io(e)),
                }
            }
        }
    }
}

/// Parks the thread until `fd` is ready for `ready`, an error or hang-up
/// shows, or `left` has passed (the caller's next attempt tells which).
fn poll_fd(fd: RawFd, ready: Ready, left: Duration) -> std::io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events: match ready {
            Ready::Read => libc::POLLIN,
            Ready::Write => libc::POLLOUT,
        },
        revents: 0,
    };
    // Rounded up: a wait of less than 1 ms is not a busy loop.
    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Decodes a message at the front of a buffer: `None` while incomplete,
/// else the message and its length.
type Decoder<T> = fn(&[u8]) -> Result<Option<(T, usize)>, WireError>;

/// Runs blocking code (connecting to the helper) from async code: on a
/// multi-thread runtime the worker thread is handed to the other tasks
/// meanwhile. Handovers do not need it: they wait as tasks.
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

    /// A fake listener that answers each frame only when told to (a
    /// send on `go`), with the frame's seq.
    fn answer_when_told(mut peer: UnixStream) -> std::sync::mpsc::Sender<()> {
        let (go, told) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut greeted = false;
            loop {
                if !greeted {
                    if let Ok(Some((_, n))) = Hello::decode(&buf) {
                        buf.drain(..n);
                        peer.write_all(&Welcome::Accept.encode()).unwrap();
                        greeted = true;
                        continue;
                    }
                } else if let Ok(Some((f, n))) = wire::decode_frame(&buf) {
                    buf.drain(..n);
                    if told.recv().is_err() {
                        return;
                    }
                    let mut out = Vec::new();
                    wire::encode_frame(&mut out, Kind::Ack, f.seq, b"");
                    peer.write_all(&out).unwrap();
                    continue;
                }
                match peer.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        go
    }

    /// Threads of this process whose name starts with `prefix`.
    fn threads_named(prefix: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
            })
            .count()
    }

    #[test]
    fn async_handovers_run_on_the_runtime_thread_alone() {
        // Built as the shared runtime is, under a name of its own.
        const NAME: &str = "sc-client-test";
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(4)
            .thread_name(NAME)
            .enable_all()
            .build()
            .unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let t = answer(b, Welcome::Accept, vec![Kind::Ack; 50]);
        let c = Arc::new(Client::new(a, "0.1.0"));
        let c2 = c.clone();
        let ok = rt
            .block_on(rt.spawn(async move {
                let mut ok = 0;
                let body = vec![7u8; 300_000]; // more than the socket buffer
                for i in 0..50 {
                    let payload = if i % 2 == 0 { &body[..] } else { b"x" };
                    if c2.handover_async(Kind::Traces, payload).await.is_ok() {
                        ok += 1;
                    }
                }
                ok
            }))
            .unwrap();
        assert_eq!(ok, 50);
        // No block_in_place: no thread brought in to carry the runtime.
        assert_eq!(threads_named(NAME), 1);
        drop(c);
        t.join().unwrap();
    }

    /// A runtime on the test's own thread, for the async handover.
    fn current_thread_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn an_async_handover_dropped_while_waiting_leaves_the_connection_usable() {
        let rt = current_thread_runtime();
        let (a, b) = UnixStream::pair().unwrap();
        let go = answer_when_told(b);
        let c = Client::new(a, "0.1.0");
        rt.block_on(async {
            // Written whole, then dropped while waiting for its Ack.
            let cut = tokio::time::timeout(
                Duration::from_millis(50),
                c.handover_async(Kind::Traces, b"x"),
            )
            .await;
            assert!(cut.is_err());
            assert!(!c.is_broken());
            // The late Ack (seq 1) is skipped; seq 2's is the answer.
            go.send(()).unwrap();
            go.send(()).unwrap();
            assert!(c.handover_async(Kind::Traces, b"y").await.is_ok());
        });
        // The sync path on the same connection.
        go.send(()).unwrap();
        assert!(c.handover(Kind::Traces, b"z").is_ok());
    }

    #[test]
    fn an_async_handover_dropped_mid_frame_breaks_the_connection() {
        let rt = current_thread_runtime();
        let (a, b) = UnixStream::pair().unwrap();
        let mut c = Client::new(a, "0.1.0");
        // Past the handshake by hand: the peer never reads the frame.
        c.conn.get_mut().session.state = State::Ready;
        let big = vec![1u8; 4_000_000];
        rt.block_on(async {
            let cut = tokio::time::timeout(
                Duration::from_millis(50),
                c.handover_async(Kind::Traces, &big),
            )
            .await;
            assert!(cut.is_err());
        });
        assert!(c.is_broken(), "{:?}", c.broken_reason());
        assert!(matches!(
            c.handover(Kind::Traces, b"x"),
            Err(HandoverError::Broken(_))
        ));
        drop(b);
    }

    #[test]
    fn without_a_runtime_an_async_handover_fails_and_leaves_it_usable() {
        let (a, b) = UnixStream::pair().unwrap();
        // Two: the first frame may get through if the welcome was quick.
        let t = answer(b, Welcome::Accept, vec![Kind::Ack, Kind::Ack]);
        let c = Client::new(a, "0.1.0");
        let r = crate::block_on::block_on(c.handover_async(Kind::Traces, b"x"));
        assert!(matches!(r, Err(HandoverError::Wait(_))), "{r:?}");
        assert!(!c.is_broken());
        assert!(c.handover(Kind::Traces, b"y").is_ok());
        drop(c);
        t.join().unwrap();
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
