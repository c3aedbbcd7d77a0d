//! Feature-flag exposures: deduplicated events sent as JSON through the
//! agent's EVP proxy by a [`BatchWorker`].
//!
//! Every time a subject is shown a variant the experiment needs one
//! exposure, not one per evaluation. [`Dedup`] is an LRU keyed by
//! (flag, subject id) holding the last (allocation, variant) sent: the same
//! assignment again is suppressed, a changed one goes out.
//!
//! A mark is pending until the agent answers: it is made when the event is
//! queued (so a repeat is suppressed while the first is in flight) and
//! stays only if the agent accepts the event. An event refused for good
//! (a 4xx other than 408/429), alone over the payload cap, or evicted from
//! a full buffer un-marks its entry ([`Dedup::forget`]): the next identical
//! exposure is sent again. Un-marks are counted in [`UNMARKED`], which a
//! sidecar listener passes on to its clients with every `Ack`, so a worker
//! forgets its own marks too (see [`Dedup::sync`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::agent::{Post, SendReport};
use crate::batch::{BatchSink, BatchWorker};
use crate::encode::One;
use crate::http::{Client, Endpoint, UrlError};
use crate::retry::RetryPolicy;
use tokio_util::sync::CancellationToken;

mod event;

#[cfg(test)]
pub(crate) use event::tests::sample as sample_exposure;
pub use event::{Exposure, Packer, MIN_SIZE};

/// Dedup entries un-marked in this process so far (events refused for
/// good or dropped after being admitted). A listener sends it with every
/// `Ack`; a change tells its clients to forget their own marks.
pub static UNMARKED: AtomicU64 = AtomicU64::new(0);

/// The listener's [`UNMARKED`] as last seen by this process (a sidecar
/// client); 0 elsewhere.
pub static LISTENER_UNMARKED: AtomicU64 = AtomicU64::new(0);

/// The EVP proxy path for exposures.
pub const EXPOSURES_PATH: &str = "/evp_proxy/v2/api/v2/exposures";
/// The intake's limit on one request body.
pub const MAX_PAYLOAD: usize = 5 * 1024 * 1024;
/// Exposures waiting that trigger an early flush.
pub const FLUSH_AT: usize = 1_000;

/// Service context sent with every payload; empty fields are left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    pub service: String,
    pub env: String,
    pub version: String,
}

/// An exposure's identity for [`Dedup`]: `key` hashes (flag, subject id),
/// `value` hashes (allocation, variant). Made from the argument bytes as
/// they are (no copy, no UTF-8 check), so the same Ruby Strings always give
/// the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupKey {
    pub key: u128,
    pub value: u128,
}

impl DedupKey {
    pub fn new(flag: &[u8], subject_id: &[u8], allocation: &[u8], variant: &[u8]) -> DedupKey {
        DedupKey {
            key: hash_pair(flag, subject_id),
            value: hash_pair(allocation, variant),
        }
    }

    pub fn of(e: &Exposure) -> DedupKey {
        let e = e.view();
        DedupKey::new(
            e.flag.as_bytes(),
            e.subject_id.as_bytes(),
            e.allocation.as_bytes(),
            e.variant.as_bytes(),
        )
    }
}

/// A 128-bit hash of two byte strings, in one pass: two lanes of folded
/// 64x64->128 multiplies (the wyhash/folded-multiply family) over 8-byte
/// words, each string's length mixed in so ("ab", "c") and ("a", "bc")
/// differ. Not cryptographic (neither was the fixed-key SipHash it
/// replaces): a collision among honest ids takes ~2^64 of them. Keyed
/// per process ([`SEED`]), so ids chosen to collide cannot be worked out
/// from this source.
fn hash_pair(a: &[u8], b: &[u8]) -> u128 {
    const K: [u64; 4] = [
        0xa076_1d64_78bd_642f,
        0xe703_7ed1_a0b4_28db,
        0x8ebc_6af0_9c88_c6e3,
        0x5899_65cc_7537_4cc3,
    ];
    #[inline(always)]
    fn fold(x: u64, y: u64) -> u64 {
        let r = u128::from(x).wrapping_mul(u128::from(y));
        (r as u64) ^ ((r >> 64) as u64)
    }
    let seed = *SEED;
    let (mut h1, mut h2) = (K[0] ^ seed.0, K[1] ^ seed.1);
    for s in [a, b] {
        let mut chunks = s.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            h1 = fold(h1 ^ w, K[2]);
            h2 = fold(h2 ^ w.rotate_left(29), K[3]);
        }
        let w = tail(chunks.remainder()) ^ ((s.len() as u64) << 56) ^ (s.len() as u64);
        h1 = fold(h1 ^ w, K[2] ^ s.len() as u64);
        h2 = fold(h2 ^ w.rotate_left(29), K[3] ^ s.len() as u64);
    }
    let (h1, h2) = (fold(h1, K[1] ^ h2), fold(h2, K[0] ^ h1));
    (u128::from(h1) << 64) | u128::from(h2)
}

/// Random keys of this process for [`hash_pair`]. Dedup keys never leave
/// the process (a sidecar listener hashes the events it receives itself),
/// and a forked child, which inherits them, starts with an empty cache.
static SEED: std::sync::LazyLock<(u64, u64)> = std::sync::LazyLock::new(|| {
    use std::hash::BuildHasher;
    let s = std::collections::hash_map::RandomState::new();
    (s.hash_one(1u8), s.hash_one(2u8))
});

/// The last 0 to 7 bytes of a string as one word, without a copy loop
/// (for a given length, distinct bytes give distinct words): 4 to 7 bytes
/// as two overlapping 4-byte reads, 1 to 3 as the first, middle and last.
#[inline(always)]
fn tail(r: &[u8]) -> u64 {
    let n = r.len();
    if n >= 4 {
        let lo = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
        let hi = u32::from_le_bytes([r[n - 4], r[n - 3], r[n - 2], r[n - 1]]);
        u64::from(lo) | (u64::from(hi) << 32)
    } else if n > 0 {
        (u64::from(r[0]) << 16) | (u64::from(r[n / 2]) << 8) | u64::from(r[n - 1])
    } else {
        0
    }
}

/// A HashMap hasher for keys that already are uniform hashes: folds the
/// 128-bit key to 64 bits (no second hash).
#[derive(Default, Clone, Copy)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.0 ^= u64::from_le_bytes(w);
        }
    }
    fn write_u128(&mut self, i: u128) {
        self.0 = (i as u64) ^ ((i >> 64) as u64);
    }
}

type PrehashedMap<V> = HashMap<u128, V, std::hash::BuildHasherDefault<Prehashed>>;

/// No slot: the end of the recency list.
const NIL: u32 = u32::MAX;

/// One entry of [`Dedup`]'s recency list.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u128,
    value: u128,
    newer: u32,
    older: u32,
}

/// LRU of the last assignment sent per (flag, subject id).
///
/// Keys and values are stored as 128-bit hashes ([`DedupKey`]), so
/// admitting an exposure allocates nothing per string. Recency is a doubly
/// linked list threaded through a slab of slots: a hit, an insert and an
/// eviction are O(1) with no allocation once the cache is full.
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    index: PrehashedMap<u32>,
    slots: Vec<Slot>,
    newest: u32,
    oldest: u32,
    /// The [`LISTENER_UNMARKED`] these marks were made under.
    epoch: u64,
}

/// What [`Dedup::admit`] replaced, to undo it if the event is not queued.
#[derive(Debug)]
pub struct Admitted {
    key: u128,
    previous: Option<u128>,
}

impl Dedup {
    pub fn new(capacity: usize) -> Dedup {
        Dedup {
            capacity: capacity.clamp(1, NIL as usize - 1),
            index: PrehashedMap::default(),
            slots: Vec::new(),
            newest: NIL,
            oldest: NIL,
            epoch: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn clear(&mut self) {
        self.index.clear();
        self.slots.clear();
        self.newest = NIL;
        self.oldest = NIL;
    }

    fn unlink(&mut self, i: u32) {
        let Slot { newer, older, .. } = self.slots[i as usize];
        match newer {
            NIL => self.newest = older,
            n => self.slots[n as usize].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o as usize].newer = newer,
        }
    }

    fn push_newest(&mut self, i: u32) {
        let s = &mut self.slots[i as usize];
        s.newer = NIL;
        s.older = self.newest;
        match self.newest {
            NIL => self.oldest = i,
            n => self.slots[n as usize].newer = i,
        }
        self.newest = i;
    }

    /// `None` when this exact assignment was the last one sent for the
    /// flag and subject (a duplicate); else records it as sent.
    pub fn admit(&mut self, e: &Exposure) -> Option<Admitted> {
        self.admit_key(DedupKey::of(e))
    }

    /// As [`Dedup::admit`], by key: a hash lookup and, for a repeat, a move
    /// to the front of the recency list.
    pub fn admit_key(&mut self, k: DedupKey) -> Option<Admitted> {
        if let Some(&i) = self.index.get(&k.key) {
            if i != self.newest {
                self.unlink(i);
                self.push_newest(i);
            }
            let slot = &mut self.slots[i as usize];
            if slot.value == k.value {
                return None;
            }
            let previous = std::mem::replace(&mut slot.value, k.value);
            return Some(Admitted {
                key: k.key,
                previous: Some(previous),
            });
        }
        let fresh = Slot {
            key: k.key,
            value: k.value,
            newer: NIL,
            older: NIL,
        };
        let i = if self.index.len() >= self.capacity && self.oldest != NIL {
            // Full: the least recently used slot is reused.
            let i = self.oldest;
            self.unlink(i);
            self.index.remove(&self.slots[i as usize].key);
            self.slots[i as usize] = fresh;
            i
        } else {
            self.slots.push(fresh);
            (self.slots.len() - 1) as u32
        };
        self.push_newest(i);
        self.index.insert(k.key, i);
        Some(Admitted {
            key: k.key,
            previous: None,
        })
    }

    /// Undoes an `admit` whose event could not be queued.
    pub fn revert(&mut self, a: Admitted) {
        let Some(&i) = self.index.get(&a.key) else {
            return;
        };
        match a.previous {
            Some(prev) => self.slots[i as usize].value = prev,
            None => self.remove(i),
        }
    }

    /// Un-marks `k` (its event was refused for good or dropped) if the
    /// entry still holds that assignment: the next identical exposure is
    /// sent again. A newer assignment for the same key is left alone.
    /// Returns whether an entry was removed.
    pub fn forget(&mut self, k: DedupKey) -> bool {
        match self.index.get(&k.key) {
            Some(&i) if self.slots[i as usize].value == k.value => {
                self.remove(i);
                true
            }
            _ => false,
        }
    }

    /// Forgets every mark when the listener's count of un-marks moved
    /// since the marks were made: some event this process handed over may
    /// have been refused, and its repeat must reach the listener again
    /// (whose own LRU still suppresses the others).
    pub fn sync(&mut self, listener_unmarked: u64) {
        if listener_unmarked != self.epoch {
            self.clear();
            self.epoch = listener_unmarked;
        }
    }

    /// Removes slot `i`, keeping the slab dense (the last slot moves into
    /// the hole) and the recency order intact.
    fn remove(&mut self, i: u32) {
        self.unlink(i);
        self.index.remove(&self.slots[i as usize].key);
        let last = (self.slots.len() - 1) as u32;
        if i != last {
            let moved = self.slots[last as usize];
            self.slots[i as usize] = moved;
            match moved.newer {
                NIL => self.newest = i,
                n => self.slots[n as usize].older = i,
            }
            match moved.older {
                NIL => self.oldest = i,
                o => self.slots[o as usize].newer = i,
            }
            self.index.insert(moved.key, i);
        }
        self.slots.pop();
    }
}

struct Subject<'a>(event::View<'a>);

impl Serialize for Subject<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("id", self.0.subject_id)?;
        m.serialize_entry("attributes", &self.0.attributes)?;
        m.end()
    }
}

impl Serialize for Exposure {
    /// The intake's event, written from the packed buffer in place.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.view();
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("timestamp", &e.timestamp_ms)?;
        m.serialize_entry("allocation", &One("key", e.allocation))?;
        m.serialize_entry("flag", &One("key", e.flag))?;
        m.serialize_entry("variant", &One("key", e.variant))?;
        m.serialize_entry("subject", &Subject(e))?;
        m.end()
    }
}

impl Serialize for Context {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = [
            ("service", &self.service),
            ("env", &self.env),
            ("version", &self.version),
        ];
        let present = fields.iter().filter(|(_, v)| !v.is_empty()).count();
        let mut m = s.serialize_map(Some(present))?;
        for (k, v) in fields {
            if !v.is_empty() {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

/// Request bodies, each with how many exposures it holds and the index
/// just past its last one.
pub type Bodies = Vec<(Vec<u8>, usize, usize)>;

/// JSON bodies `{"context":{..},"exposures":[..]}`, each at most `cap`
/// bytes, with how many exposures each holds and the index in `events`
/// just past its last one; plus the indices of the exposures that alone
/// exceed the cap (dropped).
pub fn encode(context: &Context, events: &[Exposure], cap: usize) -> (Bodies, Vec<usize>) {
    let mut head = b"{\"context\":".to_vec();
    // Serialising strings and numbers cannot fail.
    let _ = serde_json::to_writer(&mut head, context);
    head.extend_from_slice(b",\"exposures\":[");
    const TAIL: &[u8] = b"]}";
    let mut out = Vec::new();
    let mut oversized = Vec::new();
    let mut body = head.clone();
    let mut count = 0;
    for (i, e) in events.iter().enumerate() {
        let before = body.len();
        if count > 0 {
            body.push(b',');
        }
        let _ = serde_json::to_writer(&mut body, e);
        if body.len() + TAIL.len() <= cap {
            count += 1;
            continue;
        }
        body.truncate(before);
        if count > 0 {
            body.extend_from_slice(TAIL);
            out.push((std::mem::replace(&mut body, head.clone()), count, i));
            count = 0;
            let _ = serde_json::to_writer(&mut body, e);
            if body.len() + TAIL.len() <= cap {
                count = 1;
                continue;
            }
            body.truncate(head.len());
        }
        oversized.push(i);
    }
    if count > 0 {
        body.extend_from_slice(TAIL);
        out.push((body, count, events.len()));
    }
    (out, oversized)
}

/// Counters kept beside the batch worker's.
#[derive(Debug, Default)]
pub struct ExposureCounters {
    pub recorded: AtomicU64,
    pub deduplicated: AtomicU64,
    pub attributes_dropped: AtomicU64,
    /// Dedup entries un-marked because their event was refused for good
    /// or dropped (see the module doc).
    pub unmarked: AtomicU64,
}

/// Sends exposures through the agent's EVP proxy.
pub struct EvpSink {
    url: String,
    client: Client,
    context: Context,
    timeout: Duration,
    deadline: Duration,
    retry: RetryPolicy,
    max_payload: usize,
    dedup: Mutex<Dedup>,
    pub counters: ExposureCounters,
}

impl EvpSink {
    pub fn new(
        url: &str,
        context: Context,
        timeout: Duration,
        dedup_cache_size: usize,
    ) -> Result<EvpSink, UrlError> {
        Ok(EvpSink {
            url: url.to_owned(),
            client: Client::new(Endpoint::parse(url)?),
            context,
            timeout,
            deadline: timeout * 3,
            retry: RetryPolicy::default(),
            max_payload: MAX_PAYLOAD,
            dedup: Mutex::new(Dedup::new(dedup_cache_size)),
            counters: ExposureCounters::default(),
        })
    }

    /// Caps request bodies at `bytes` (tests use small caps).
    pub fn with_max_payload(mut self, bytes: usize) -> EvpSink {
        self.max_payload = bytes;
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn context(&self) -> &Context {
        &self.context
    }

    pub fn dedup(&self) -> MutexGuard<'_, Dedup> {
        self.dedup.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Un-marks the dedup entries of `events` (refused for good or
    /// dropped), counted here and in [`UNMARKED`].
    pub fn forget<'a>(&self, events: impl IntoIterator<Item = &'a Exposure>) {
        let mut dedup = self.dedup();
        let n = events
            .into_iter()
            .filter(|e| dedup.forget(DedupKey::of(e)))
            .count() as u64;
        drop(dedup);
        if n > 0 {
            self.counters.unmarked.fetch_add(n, Ordering::Relaxed);
            UNMARKED.fetch_add(n, Ordering::AcqRel);
        }
    }
}

impl BatchSink<Exposure> for EvpSink {
    async fn send(
        &self,
        batch: &[Exposure],
        generation: u64,
        stop_retrying: &CancellationToken,
    ) -> SendReport {
        let deadline = Instant::now() + self.deadline;
        let (bodies, oversized) = encode(&self.context, batch, self.max_payload);
        self.forget(oversized.iter().map(|&i| &batch[i]));
        let mut report = SendReport {
            oversized_traces: oversized.len(),
            ..Default::default()
        };
        if !oversized.is_empty() {
            report.note_error(format!(
                "exposure(s) dropped: each alone exceeds the {} byte payload limit",
                self.max_payload
            ));
        }
        let headers = [
            ("Content-Type", "application/json"),
            ("X-Datadog-EVP-Subdomain", "event-platform-intake"),
        ];
        let post = Post {
            client: &self.client,
            generation,
            path: EXPOSURES_PATH,
            headers: &headers,
            timeout: self.timeout,
            retry: &self.retry,
            stop_retrying: Some(stop_retrying),
        };
        // Index just past the previous body: where a retry starts.
        let mut start = 0;
        let mut in_bodies = 0;
        for (body, count, end) in bodies {
            match post.send(Bytes::from(body), deadline, &mut report).await {
                Ok(_) => report.trace_count += count,
                Err(u) if u.retryable => {
                    // Kept for later, from this body on; exposures found
                    // oversized from here on are counted when met again.
                    report.retry_from = Some(start);
                    report.failed_traces += batch.len() - start;
                    report.oversized_traces = start - in_bodies;
                    if u.maybe_arrived {
                        report.timed_out_traces += count;
                    }
                    break;
                }
                Err(u) => {
                    // Refused for good: the next identical exposure is
                    // sent again.
                    self.forget(&batch[start..end]);
                    report.failed_traces += count;
                    if u.maybe_arrived {
                        report.timed_out_traces += count;
                    }
                }
            }
            in_bodies += count;
            start = end;
        }
        report
    }

    fn attempt_timeout(&self) -> Duration {
        self.client.attempt_timeout(self.timeout)
    }

    fn discarded(&self, items: &[Exposure]) {
        self.forget(items);
    }

    fn reset_in_child(&self) {
        self.dedup().clear();
        for c in [
            &self.counters.recorded,
            &self.counters.deduplicated,
            &self.counters.attributes_dropped,
            &self.counters.unmarked,
        ] {
            c.store(0, Ordering::Release);
        }
    }
}

/// Exposures: dedup in front of a batch worker, sending through the
/// sidecar when the process is a sidecar client.
pub type ExposureWorker = BatchWorker<Exposure, crate::sidecar::sink::Sidecar<EvpSink>>;

/// Records one exposure: false when it was deduplicated or dropped.
pub fn record(worker: &Arc<ExposureWorker>, e: Exposure, attributes_dropped: u64) -> bool {
    let key = DedupKey::of(&e);
    match admit(worker, key) {
        Some(admitted) => queue(worker, admitted, e, attributes_dropped),
        None => false,
    }
}

/// The first half of [`record`], before the event is built: counts it,
/// and `None` for a duplicate (counted). Callers that can hash their
/// arguments without copying them build the event only when admitted.
pub fn admit(worker: &Arc<ExposureWorker>, key: DedupKey) -> Option<Admitted> {
    let c = &worker.sink().counters;
    c.recorded.fetch_add(1, Ordering::Relaxed);
    let admitted = {
        let mut dedup = worker.sink().dedup();
        dedup.sync(LISTENER_UNMARKED.load(Ordering::Acquire));
        dedup.admit_key(key)
    };
    if admitted.is_none() {
        c.deduplicated.fetch_add(1, Ordering::Relaxed);
    }
    admitted
}

/// The second half of [`record`]: queues an admitted event (`attributes_dropped`
/// of its attributes were left out); if it cannot be queued, the dedup
/// entry is undone so the next identical exposure is not suppressed.
pub fn queue(
    worker: &Arc<ExposureWorker>,
    admitted: Admitted,
    e: Exposure,
    attributes_dropped: u64,
) -> bool {
    if attributes_dropped > 0 {
        worker
            .sink()
            .counters
            .attributes_dropped
            .fetch_add(attributes_dropped, Ordering::Relaxed);
    }
    if worker.write(e) {
        return true;
    }
    unadmit(worker, admitted);
    false
}

/// Undoes [`admit`] for an event that was not queued.
pub fn unadmit(worker: &Arc<ExposureWorker>, admitted: Admitted) {
    worker.sink().dedup().revert(admitted);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::span::AttributeValue;

    fn exp(flag: &str, subject: &str, alloc: &str, variant: &str) -> Exposure {
        Exposure::new(1_700_000_000_000, flag, alloc, variant, subject, &[])
    }

    #[test]
    fn dedup_suppresses_repeats_and_sends_changes() {
        let mut d = Dedup::new(10);
        let a = exp("f", "u1", "al", "A");
        let b = exp("f", "u1", "al", "B");
        let sent: Vec<bool> = [&a, &a, &b, &a]
            .iter()
            .map(|e| d.admit(e).is_some())
            .collect();
        assert_eq!(sent, [true, false, true, true]);
        // Another subject or flag is its own key.
        assert!(d.admit(&exp("f", "u2", "al", "A")).is_some());
        assert!(d.admit(&exp("g", "u1", "al", "A")).is_some());
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut d = Dedup::new(2);
        assert!(d.admit(&exp("f", "1", "a", "v")).is_some());
        assert!(d.admit(&exp("f", "2", "a", "v")).is_some());
        assert!(d.admit(&exp("f", "1", "a", "v")).is_none()); // 1 is now recent
        assert!(d.admit(&exp("f", "3", "a", "v")).is_some()); // evicts 2
        assert_eq!(d.len(), 2);
        assert!(d.admit(&exp("f", "1", "a", "v")).is_none());
        assert!(d.admit(&exp("f", "2", "a", "v")).is_some()); // was evicted: sent again
    }

    #[test]
    fn keys_do_not_run_together() {
        let mut d = Dedup::new(10);
        assert!(d.admit(&exp("ab", "c", "a", "v")).is_some());
        assert!(d.admit(&exp("a", "bc", "a", "v")).is_some());
        assert!(d.admit(&exp("f", "u", "ab", "c")).is_some());
        assert!(d.admit(&exp("f", "u", "a", "bc")).is_some());
    }

    #[test]
    fn revert_restores_what_was_there() {
        let mut d = Dedup::new(10);
        d.admit(&exp("f", "u", "a", "A"));
        let changed = d.admit(&exp("f", "u", "a", "B")).unwrap();
        d.revert(changed);
        assert!(d.admit(&exp("f", "u", "a", "A")).is_none());
        let new = d.admit(&exp("g", "u", "a", "A")).unwrap();
        d.revert(new);
        assert!(d.admit(&exp("g", "u", "a", "A")).is_some());
    }

    #[test]
    fn revert_of_a_new_entry_keeps_the_recency_order() {
        let mut d = Dedup::new(3);
        for s in ["1", "2", "3"] {
            d.admit(&exp("f", s, "a", "v"));
        }
        // Reverting "1" (the oldest, in the middle of the slab after a
        // touch) must leave 2 and 3 in order.
        d.admit(&exp("f", "1", "a", "v"));
        let new = d.admit(&exp("f", "4", "a", "v")).unwrap(); // evicts 2
        d.revert(new);
        assert_eq!(d.len(), 2);
        assert!(d.admit(&exp("f", "5", "a", "v")).is_some());
        assert!(d.admit(&exp("f", "6", "a", "v")).is_some()); // evicts 3
        assert!(d.admit(&exp("f", "1", "a", "v")).is_none());
        assert!(d.admit(&exp("f", "3", "a", "v")).is_some());
    }

    #[test]
    fn forget_unmarks_only_the_assignment_it_names() {
        let mut d = Dedup::new(10);
        let a = exp("f", "u", "al", "A");
        let b = exp("f", "u", "al", "B");
        d.admit(&a);
        d.admit(&exp("f", "other", "al", "A"));
        // A newer assignment for the key is left alone.
        assert!(!d.forget(DedupKey::of(&b)));
        assert!(d.admit(&a).is_none());
        assert!(d.forget(DedupKey::of(&a)));
        assert!(!d.forget(DedupKey::of(&a)));
        assert_eq!(d.len(), 1);
        assert!(d.admit(&a).is_some(), "un-marked: sent again");
        assert!(d.admit(&exp("f", "other", "al", "A")).is_none());
    }

    #[test]
    fn sync_forgets_every_mark_when_the_listener_unmarked_more() {
        let mut d = Dedup::new(10);
        let a = exp("f", "u", "al", "A");
        d.sync(0);
        d.admit(&a);
        d.sync(0);
        assert!(d.admit(&a).is_none());
        d.sync(3);
        assert!(d.is_empty());
        assert!(d.admit(&a).is_some());
        d.sync(3);
        assert!(d.admit(&a).is_none());
    }

    fn evp_worker(url: &str, capacity: usize) -> Arc<ExposureWorker> {
        let sink = EvpSink::new(url, Context::default(), Duration::from_secs(2), 100).unwrap();
        Arc::new(BatchWorker::new(
            crate::sidecar::sink::Sidecar::new(sink),
            capacity,
            FLUSH_AT,
            Duration::from_secs(3600),
            "test exposures",
        ))
    }

    fn flush(h: &tokio::runtime::Handle, w: &Arc<ExposureWorker>) -> bool {
        let f = w.flush();
        h.block_on(async { tokio::time::timeout(Duration::from_secs(10), f).await })
            .unwrap_or(false)
    }

    #[test]
    fn an_exposure_refused_for_good_is_sent_again_an_accepted_one_is_not() {
        let _g = crate::runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (h, _) = crate::runtime::handle().unwrap();
        let (url, bodies) = h.block_on(crate::test_http::server(vec![400, 202]));
        let w = evp_worker(&url, 100);
        crate::worker::register(&w).unwrap();
        let x = exp("f", "u", "al", "A");
        let unmarked_before = UNMARKED.load(Ordering::SeqCst);
        assert!(record(&w, x.clone(), 0));
        // In flight (queued, not answered): a repeat is suppressed.
        assert!(!record(&w, x.clone(), 0));
        assert!(!flush(&h, &w), "the agent refused it");
        assert_eq!(w.sink().counters.unmarked.load(Ordering::SeqCst), 1);
        assert!(UNMARKED.load(Ordering::SeqCst) > unmarked_before);
        assert!(record(&w, x.clone(), 0), "un-marked: sent again");
        assert!(flush(&h, &w));
        assert!(!record(&w, x.clone(), 0), "accepted: deduplicated");
        let s = w.stats();
        assert_eq!((s.sent, s.failed, s.queued), (1, 1, 0));
        assert_eq!(w.sink().counters.deduplicated.load(Ordering::SeqCst), 2);
        let sent: Vec<serde_json::Value> = bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect();
        assert_eq!(sent.len(), 2);
        for b in &sent {
            assert_eq!(b["exposures"][0]["subject"]["id"], "u");
        }
        w.stop();
    }

    #[test]
    fn an_exposure_too_large_to_send_is_unmarked() {
        let _g = crate::runtime::tests::LIFECYCLE
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (h, _) = crate::runtime::handle().unwrap();
        let (url, bodies) = h.block_on(crate::test_http::server(vec![202]));
        let sink = EvpSink::new(&url, Context::default(), Duration::from_secs(2), 100)
            .unwrap()
            .with_max_payload(300);
        let w = Arc::new(BatchWorker::new(
            crate::sidecar::sink::Sidecar::new(sink),
            100,
            FLUSH_AT,
            Duration::from_secs(3600),
            "test exposures",
        ));
        crate::worker::register(&w).unwrap();
        let big = exp("f", &"x".repeat(400), "al", "A");
        let small = exp("f", "u", "al", "A");
        assert!(record(&w, big.clone(), 0));
        assert!(record(&w, small.clone(), 0));
        assert!(!flush(&h, &w), "one was dropped");
        assert_eq!(w.sink().counters.unmarked.load(Ordering::SeqCst), 1);
        assert!(record(&w, big, 0), "dropped: not marked");
        assert!(!record(&w, small, 0), "sent: marked");
        assert_eq!(bodies.lock().unwrap().len(), 1);
        w.stop();
    }

    #[test]
    fn lru_matches_a_model_over_random_operations() {
        // A Vec-based model (most recent last) against the slab LRU.
        let mut d = Dedup::new(8);
        let mut model: Vec<(String, String)> = Vec::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let subject = (x % 13).to_string();
            let variant = ((x >> 8) % 3).to_string();
            let revert = (x >> 16).is_multiple_of(5);
            let e = exp("f", &subject, "a", &variant);
            let pos = model.iter().position(|(s, _)| *s == subject);
            let dup = pos.is_some_and(|p| model[p].1 == variant);
            let got = d.admit(&e);
            assert_eq!(got.is_none(), dup);
            let before = model.clone();
            if let Some(p) = pos {
                let (s, _) = model.remove(p);
                model.push((s, variant.clone()));
            } else {
                if model.len() == 8 {
                    model.remove(0);
                }
                model.push((subject.clone(), variant.clone()));
            }
            if let (Some(a), true) = (got, revert) {
                d.revert(a);
                // A revert restores the value or removes the new entry (an
                // eviction it caused is not undone; recency stays touched).
                match pos {
                    Some(_) => {
                        let p = model.iter().position(|(s, _)| *s == subject).unwrap();
                        model[p].1 = before[pos.unwrap()].1.clone();
                    }
                    None => {
                        model.pop();
                    }
                }
            }
            assert_eq!(d.len(), model.len());
        }
    }

    #[test]
    fn hash_pair_separates_lengths_and_lanes() {
        assert_ne!(hash_pair(b"ab", b"c"), hash_pair(b"a", b"bc"));
        assert_ne!(hash_pair(b"", b"x"), hash_pair(b"x", b""));
        assert_ne!(hash_pair(b"12345678", b""), hash_pair(b"1234567", b"8"));
        assert_ne!(hash_pair(b"a\0", b""), hash_pair(b"a", b""));
        let h = hash_pair(b"checkout", b"user-1");
        assert_ne!(h as u64, (h >> 64) as u64);
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000u32 {
            assert!(seen.insert(hash_pair(b"flag", i.to_string().as_bytes())));
        }
    }

    #[test]
    fn encodes_the_intake_shape_and_omits_empty_context() {
        let e = Exposure::new(
            1_700_000_000_000,
            "flag-1",
            "alloc-2",
            "on",
            "user-7",
            &[
                ("country".into(), AttributeValue::String("fr".into())),
                ("age".into(), AttributeValue::Int(30)),
                ("beta".into(), AttributeValue::Bool(true)),
            ],
        );
        let ctx = Context {
            service: "svc".into(),
            env: String::new(),
            version: "1.0".into(),
        };
        let (bodies, oversized) = encode(&ctx, &[e], MAX_PAYLOAD);
        assert!(oversized.is_empty());
        let v: serde_json::Value = serde_json::from_slice(&bodies[0].0).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "context": {"service": "svc", "version": "1.0"},
                "exposures": [{
                    "timestamp": 1_700_000_000_000i64,
                    "allocation": {"key": "alloc-2"},
                    "flag": {"key": "flag-1"},
                    "variant": {"key": "on"},
                    "subject": {"id": "user-7", "attributes": {"country": "fr", "age": 30, "beta": true}}
                }]
            })
        );
    }

    #[test]
    fn splits_under_the_cap_and_drops_what_cannot_fit() {
        let ctx = Context::default();
        let mut events: Vec<Exposure> = (0..100)
            .map(|i| exp("f", &i.to_string(), "a", "v"))
            .collect();
        events[50] = exp("f", &"x".repeat(5_000), "a", "v");
        let (bodies, oversized) = encode(&ctx, &events, 2_000);
        assert_eq!(oversized, [50]);
        let mut ids = Vec::new();
        for (body, count, _) in &bodies {
            assert!(body.len() <= 2_000);
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            let list = v["exposures"].as_array().unwrap();
            assert_eq!(list.len(), *count);
            ids.extend(
                list.iter()
                    .map(|e| e["subject"]["id"].as_str().unwrap().to_owned()),
            );
        }
        let expected: Vec<String> = (0..100)
            .filter(|i| *i != 50)
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ids, expected);
    }
}
