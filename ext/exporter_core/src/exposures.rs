//! Feature-flag exposures: deduplicated events sent as JSON through the
//! agent's EVP proxy by a [`BatchWorker`].
//!
//! Every time a subject is shown a variant the experiment needs one
//! exposure, not one per evaluation. [`Dedup`] is an LRU keyed by
//! (flag, subject id) holding the last (allocation, variant) sent: the same
//! assignment again is suppressed, a changed one goes out.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::agent::{Post, SendReport};
use crate::batch::{BatchSink, BatchWorker};
use crate::encode::{MapOf, SeqOf};
use crate::http::{Client, Endpoint, UrlError};
use crate::retry::RetryPolicy;
use crate::span::AttributeValue;
use tokio_util::sync::CancellationToken;

/// The EVP proxy path for exposures.
pub const EXPOSURES_PATH: &str = "/evp_proxy/v2/api/v2/exposures";
/// The intake's limit on one request body.
pub const MAX_PAYLOAD: usize = 5 * 1024 * 1024;
/// Exposures waiting that trigger an early flush.
pub const FLUSH_AT: usize = 1_000;

/// One exposure event.
#[derive(Debug, Clone, PartialEq)]
pub struct Exposure {
    pub timestamp_ms: i64,
    pub flag: String,
    pub allocation: String,
    pub variant: String,
    pub subject_id: String,
    pub attributes: Vec<(String, AttributeValue)>,
}

/// Service context sent with every payload; empty fields are left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    pub service: String,
    pub env: String,
    pub version: String,
}

/// LRU of the last assignment sent per (flag, subject id).
///
/// Keys and values are stored as 128-bit hashes of their strings, so
/// admitting an exposure allocates nothing per string (a collision would
/// take ~2^64 distinct keys to become likely).
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    tick: u64,
    entries: HashMap<u128, (u128, u64)>,
    order: BTreeMap<u64, u128>,
}

/// What [`Dedup::admit`] replaced, to undo it if the event is not queued.
#[derive(Debug)]
pub struct Admitted {
    key: u128,
    previous: Option<u128>,
}

/// A 128-bit hash of two strings (two SipHash passes with distinct salts;
/// the separator keeps ("ab", "c") and ("a", "bc") apart).
fn hash_pair(a: &str, b: &str) -> u128 {
    use std::hash::{Hash, Hasher};
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        a.hash(&mut h);
        b.hash(&mut h);
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

impl Dedup {
    pub fn new(capacity: usize) -> Dedup {
        Dedup {
            capacity: capacity.max(1),
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    /// `None` when this exact assignment was the last one sent for the
    /// flag and subject (a duplicate); else records it as sent.
    pub fn admit(&mut self, e: &Exposure) -> Option<Admitted> {
        self.tick += 1;
        let tick = self.tick;
        let key = hash_pair(&e.flag, &e.subject_id);
        let value = hash_pair(&e.allocation, &e.variant);
        if let Some((v, t)) = self.entries.get_mut(&key) {
            self.order.remove(t);
            self.order.insert(tick, key);
            *t = tick;
            if *v == value {
                return None;
            }
            let previous = std::mem::replace(v, value);
            return Some(Admitted {
                key,
                previous: Some(previous),
            });
        }
        if self.entries.len() >= self.capacity {
            if let Some((_, oldest)) = self.order.pop_first() {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(key, (value, tick));
        self.order.insert(tick, key);
        Some(Admitted {
            key,
            previous: None,
        })
    }

    /// Undoes an `admit` whose event could not be queued.
    pub fn revert(&mut self, a: Admitted) {
        match a.previous {
            Some(prev) => {
                if let Some((v, _)) = self.entries.get_mut(&a.key) {
                    *v = prev;
                }
            }
            None => {
                if let Some((_, t)) = self.entries.remove(&a.key) {
                    self.order.remove(&t);
                }
            }
        }
    }
}

struct Key<'a>(&'a str);

impl Serialize for Key<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("key", self.0)?;
        m.end()
    }
}

struct Attr<'a>(&'a AttributeValue);

impl Serialize for Attr<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            AttributeValue::String(v) => s.serialize_str(v),
            AttributeValue::Bool(v) => s.serialize_bool(*v),
            AttributeValue::Int(v) => s.serialize_i64(*v),
            AttributeValue::Float(v) => s.serialize_f64(*v),
            AttributeValue::Array(items) => SeqOf(items, Attr).serialize(s),
        }
    }
}

struct Subject<'a>(&'a Exposure);

impl Serialize for Subject<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("id", &self.0.subject_id)?;
        m.serialize_entry("attributes", &MapOf(&self.0.attributes, Attr))?;
        m.end()
    }
}

impl Serialize for Exposure {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("timestamp", &self.timestamp_ms)?;
        m.serialize_entry("allocation", &Key(&self.allocation))?;
        m.serialize_entry("flag", &Key(&self.flag))?;
        m.serialize_entry("variant", &Key(&self.variant))?;
        m.serialize_entry("subject", &Subject(self))?;
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

/// JSON bodies `{"context":{..},"exposures":[..]}`, each at most `cap`
/// bytes, with how many exposures each holds and the index in `events`
/// just past its last one; plus the exposures that alone exceed the cap
/// (dropped).
pub fn encode(
    context: &Context,
    events: &[Exposure],
    cap: usize,
) -> (Vec<(Vec<u8>, usize, usize)>, usize) {
    let mut head = b"{\"context\":".to_vec();
    // Serialising strings and numbers cannot fail.
    let _ = serde_json::to_writer(&mut head, context);
    head.extend_from_slice(b",\"exposures\":[");
    const TAIL: &[u8] = b"]}";
    let mut out = Vec::new();
    let mut oversized = 0;
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
        oversized += 1;
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
}

/// Sends exposures through the agent's EVP proxy.
pub struct EvpSink {
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

    pub fn dedup(&self) -> MutexGuard<'_, Dedup> {
        self.dedup.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut report = SendReport {
            oversized_traces: oversized,
            ..Default::default()
        };
        if oversized > 0 {
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

    fn reset_in_child(&self) {
        self.dedup().clear();
        for c in [
            &self.counters.recorded,
            &self.counters.deduplicated,
            &self.counters.attributes_dropped,
        ] {
            c.store(0, Ordering::Release);
        }
    }
}

/// Exposures: dedup in front of a batch worker.
pub type ExposureWorker = BatchWorker<Exposure, EvpSink>;

/// Records one exposure: false when it was deduplicated or dropped.
pub fn record(worker: &Arc<ExposureWorker>, e: Exposure, attributes_dropped: u64) -> bool {
    let c = &worker.sink().counters;
    c.recorded.fetch_add(1, Ordering::Relaxed);
    if attributes_dropped > 0 {
        c.attributes_dropped
            .fetch_add(attributes_dropped, Ordering::Relaxed);
    }
    let admitted = worker.sink().dedup().admit(&e);
    let Some(admitted) = admitted else {
        c.deduplicated.fetch_add(1, Ordering::Relaxed);
        return false;
    };
    if worker.write(e) {
        return true;
    }
    // Not queued: the next identical exposure must not be suppressed.
    worker.sink().dedup().revert(admitted);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(flag: &str, subject: &str, alloc: &str, variant: &str) -> Exposure {
        Exposure {
            timestamp_ms: 1_700_000_000_000,
            flag: flag.into(),
            allocation: alloc.into(),
            variant: variant.into(),
            subject_id: subject.into(),
            attributes: vec![],
        }
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
    fn encodes_the_intake_shape_and_omits_empty_context() {
        let mut e = exp("flag-1", "user-7", "alloc-2", "on");
        e.attributes = vec![
            ("country".into(), AttributeValue::String("fr".into())),
            ("age".into(), AttributeValue::Int(30)),
            ("beta".into(), AttributeValue::Bool(true)),
        ];
        let ctx = Context {
            service: "svc".into(),
            env: String::new(),
            version: "1.0".into(),
        };
        let (bodies, oversized) = encode(&ctx, &[e], MAX_PAYLOAD);
        assert_eq!(oversized, 0);
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
        events[50].subject_id = "x".repeat(5_000);
        let (bodies, oversized) = encode(&ctx, &events, 2_000);
        assert_eq!(oversized, 1);
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
