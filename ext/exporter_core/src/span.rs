//! The span model: what a Ruby trace becomes once converted.
//!
//! Owned, `Send` and Ruby-free, so that everything after conversion
//! (encoding, batching, HTTP) runs without the GVL on any thread.
//!
//! Conversion is the one cost the application thread pays, so a trace is
//! laid out to need few allocations: every string of every span is copied
//! into one text buffer ([`Trace::text`]) and referred to by [`Str`]
//! ranges (several spans may refer to one copy of a string they share),
//! and all meta and metrics entries of the trace share two vectors,
//! each span owning a contiguous range of them. Rare fields (meta_struct,
//! span links, span events) stay plainly owned, in [`SpanExtras`] kept
//! beside the spans so that [`Span`] itself stays small.
//!
//! Defaults (service, env, version) and the `_dd.p.tid` tag of 128-bit
//! trace ids are not written into the trace: [`SpanView`] derives them when
//! the trace is encoded, on a background thread.

use crate::recycle::{Recycler, Reusable};
use std::borrow::Cow;
use std::sync::atomic::{AtomicU32, Ordering};

/// The meta key that carries the high 64 bits of a 128-bit trace id.
pub const TRACE_ID_HIGH_TAG: &str = "_dd.p.tid";

/// A string in its trace's text buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Str {
    start: u32,
    len: u32,
}

impl Str {
    pub fn is_empty(self) -> bool {
        self.len == 0
    }
}

/// A range of a trace's `meta` or `metrics` entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entries {
    pub start: u32,
    pub end: u32,
}

impl Entries {
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }

    pub fn len(self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(self) -> bool {
        self.end == self.start
    }
}

/// One trace: its spans, in the order given, and the storage they share.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    pub text: String,
    pub spans: Vec<Span>,
    pub meta: Vec<(Str, Str)>,
    pub metrics: Vec<(Str, f64)>,
    /// The rare fields of the spans that have any (see [`Span::extras`]).
    pub extras: Vec<SpanExtras>,
}

/// The rarely used fields of a span.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanExtras {
    /// Values already encoded as msgpack.
    pub meta_struct: Vec<(String, Vec<u8>)>,
    pub span_links: Vec<SpanLink>,
    pub span_events: Vec<SpanEvent>,
}

impl SpanExtras {
    pub fn is_empty(&self) -> bool {
        self.meta_struct.is_empty() && self.span_links.is_empty() && self.span_events.is_empty()
    }
}

static NO_EXTRAS: SpanExtras = SpanExtras {
    meta_struct: Vec::new(),
    span_links: Vec::new(),
    span_events: Vec::new(),
};

/// A span. Strings and entries live in the owning [`Trace`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Span {
    /// Full 128-bit trace id; only the low 64 bits go in `trace_id` on the wire.
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: u64,
    pub name: Str,
    pub service: Str,
    pub resource: Str,
    pub r#type: Str,
    /// Start, nanoseconds since the Unix epoch.
    pub start: i64,
    /// Duration in nanoseconds.
    pub duration: i64,
    pub error: i32,
    pub meta: Entries,
    pub metrics: Entries,
    /// 1 + the index of this span's entry in [`Trace::extras`]; 0: none.
    pub extras: u32,
}

/// A link from a span to another span, possibly of another trace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanLink {
    pub trace_id: u128,
    pub span_id: u64,
    pub attributes: Vec<(String, String)>,
    pub tracestate: String,
    pub flags: u32,
}

/// A timestamped event attached to a span.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanEvent {
    pub name: String,
    pub time_unix_nano: u64,
    pub attributes: Vec<(String, AttributeValue)>,
}

/// A span event attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttributeValue {
    String(String),
    Bool(bool),
    Int(i64),
    Float(f64),
    Array(Vec<AttributeValue>),
}

impl Trace {
    /// Copies `s` into the text buffer.
    pub fn push_str(&mut self, s: &str) -> Str {
        let start = self.text.len() as u32;
        self.text.push_str(s);
        Str {
            start,
            len: s.len() as u32,
        }
    }

    /// Keeps `extras` for the span about to be pushed; returns the value
    /// of its `extras` field.
    pub fn push_extras(&mut self, extras: SpanExtras) -> u32 {
        if extras.is_empty() {
            return 0;
        }
        self.extras.push(extras);
        self.extras.len() as u32
    }

    pub fn str(&self, s: Str) -> &str {
        &self.text[s.start as usize..(s.start + s.len) as usize]
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Views of the spans, applying `defaults`.
    pub fn views<'a>(&'a self, defaults: &'a SpanDefaults) -> impl Iterator<Item = SpanView<'a>> {
        self.spans
            .iter()
            .enumerate()
            .map(move |(i, span)| SpanView {
                trace: self,
                span,
                defaults,
                first: i == 0,
            })
    }
}

/// Process-level context applied to every span that lacks it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanDefaults {
    pub service: String,
    pub env: String,
    pub version: String,
}

/// A span as it goes on the wire:
/// - an empty `service` is the default service; an empty `resource` is the
///   span's name;
/// - meta gains, unless already present: `_dd.p.tid` (the high 64 bits of
///   a 128-bit trace id, 16 hex digits) on the first span, `env` on every
///   span and `version` on the spans of the default service, when set.
#[derive(Clone, Copy)]
pub struct SpanView<'a> {
    pub trace: &'a Trace,
    pub span: &'a Span,
    pub defaults: &'a SpanDefaults,
    pub first: bool,
}

impl<'a> SpanView<'a> {
    pub fn name(&self) -> &'a str {
        self.trace.str(self.span.name)
    }

    pub fn service(&self) -> &'a str {
        if self.span.service.is_empty() {
            &self.defaults.service
        } else {
            self.trace.str(self.span.service)
        }
    }

    pub fn resource(&self) -> &'a str {
        if self.span.resource.is_empty() {
            self.name()
        } else {
            self.trace.str(self.span.resource)
        }
    }

    pub fn r#type(&self) -> &'a str {
        self.trace.str(self.span.r#type)
    }

    /// The span's own meta entries.
    pub fn own_meta(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let t = self.trace;
        t.meta[self.span.meta.range()]
            .iter()
            .map(move |(k, v)| (t.str(*k), t.str(*v)))
    }

    fn has_meta(&self, key: &str) -> bool {
        self.own_meta().any(|(k, _)| k == key)
    }

    /// Meta entries derived from the trace id and the defaults.
    pub fn extra_meta(&self) -> Vec<(&'static str, Cow<'a, str>)> {
        let mut out = Vec::new();
        let high = (self.span.trace_id >> 64) as u64;
        if self.first && high != 0 && !self.has_meta(TRACE_ID_HIGH_TAG) {
            out.push((TRACE_ID_HIGH_TAG, Cow::Owned(format!("{high:016x}"))));
        }
        if !self.defaults.env.is_empty() && !self.has_meta("env") {
            out.push(("env", Cow::Borrowed(self.defaults.env.as_str())));
        }
        if !self.defaults.version.is_empty()
            && self.service() == self.defaults.service
            && !self.has_meta("version")
        {
            out.push(("version", Cow::Borrowed(self.defaults.version.as_str())));
        }
        out
    }

    /// The span's rare fields (empty for most spans).
    pub fn extras(&self) -> &'a SpanExtras {
        match self.span.extras {
            0 => &NO_EXTRAS,
            i => &self.trace.extras[i as usize - 1],
        }
    }

    pub fn metrics(&self) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        let t = self.trace;
        t.metrics[self.span.metrics.range()]
            .iter()
            .map(move |(k, v)| (t.str(*k), *v))
    }

    /// The low 64 bits of the trace id, as sent in the span's `trace_id`.
    pub fn trace_id_low(&self) -> u64 {
        self.span.trace_id as u64
    }
}

/// Storage of traces sent (or dropped), for the next traces converted
/// (see [`crate::recycle`]): a few hundred traces of 50 spans at most,
/// about a core's share of the last-level cache.
pub static TRACE_POOL: Recycler<Trace> = Recycler::new(4 << 20);

impl Reusable for Trace {
    fn capacity_bytes(&self) -> usize {
        fn bytes<T>(v: &Vec<T>) -> usize {
            v.capacity() * std::mem::size_of::<T>()
        }
        self.text.capacity()
            + bytes(&self.spans)
            + bytes(&self.meta)
            + bytes(&self.metrics)
            + bytes(&self.extras)
    }

    fn clear(&mut self) {
        self.text.clear();
        self.spans.clear();
        self.meta.clear();
        self.metrics.clear();
        self.extras.clear();
    }
}

/// What the last trace built needed per span (text bytes, meta and
/// metrics entries), so that the next one allocates its storage once
/// instead of growing it span by span. Shared by all threads: only a hint.
#[derive(Debug)]
pub struct SizeHint {
    text: AtomicU32,
    meta: AtomicU32,
    metrics: AtomicU32,
}

impl Default for SizeHint {
    fn default() -> Self {
        Self::new()
    }
}

impl SizeHint {
    /// At most this many bytes are reserved per vector from a hint: a
    /// trace unlike the last one (a few spans with huge strings, then many
    /// small spans) must not reserve what it will not use; past it,
    /// storage grows as usual.
    pub const MAX_RESERVE: usize = 1 << 20;

    pub const fn new() -> SizeHint {
        SizeHint {
            text: AtomicU32::new(0),
            meta: AtomicU32::new(0),
            metrics: AtomicU32::new(0),
        }
    }

    /// Reserves room in `t` for `spans` spans like the last trace's, plus
    /// an eighth, each vector within [`SizeHint::MAX_RESERVE`] bytes
    /// (nothing before the first trace: its storage grows).
    pub fn reserve(&self, t: &mut Trace, spans: usize) {
        let per = |a: &AtomicU32| a.load(Ordering::Relaxed) as usize * spans * 9 / 8;
        let cap = |n: usize, size: usize| n.min(SizeHint::MAX_RESERVE / size);
        t.text.reserve(cap(per(&self.text), 1));
        t.meta
            .reserve(cap(per(&self.meta), std::mem::size_of::<(Str, Str)>()));
        t.metrics
            .reserve(cap(per(&self.metrics), std::mem::size_of::<(Str, f64)>()));
    }

    /// Notes what `t` needed per span.
    pub fn learn(&self, t: &Trace) {
        let spans = t.spans.len().max(1);
        let per = |len: usize| len.div_ceil(spans).min(u32::MAX as usize) as u32;
        self.text.store(per(t.text.len()), Ordering::Relaxed);
        self.meta.store(per(t.meta.len()), Ordering::Relaxed);
        self.metrics.store(per(t.metrics.len()), Ordering::Relaxed);
    }
}

/// A span with owned fields: a convenient way to build a [`Trace`] in
/// tests and benchmarks (`Trace::from(vec![SpanData { .. }])`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanData {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: u64,
    pub name: String,
    pub service: String,
    pub resource: String,
    pub r#type: String,
    pub start: i64,
    pub duration: i64,
    pub error: i32,
    pub meta: Vec<(String, String)>,
    pub metrics: Vec<(String, f64)>,
    pub meta_struct: Vec<(String, Vec<u8>)>,
    pub span_links: Vec<SpanLink>,
    pub span_events: Vec<SpanEvent>,
}

impl From<Vec<SpanData>> for Trace {
    fn from(spans: Vec<SpanData>) -> Trace {
        let mut t = Trace::default();
        for d in spans {
            let name = t.push_str(&d.name);
            let service = t.push_str(&d.service);
            let resource = t.push_str(&d.resource);
            let r#type = t.push_str(&d.r#type);
            let start = t.meta.len() as u32;
            for (k, v) in &d.meta {
                let kv = (t.push_str(k), t.push_str(v));
                t.meta.push(kv);
            }
            let meta = Entries {
                start,
                end: t.meta.len() as u32,
            };
            let start = t.metrics.len() as u32;
            for (k, v) in &d.metrics {
                let k = t.push_str(k);
                t.metrics.push((k, *v));
            }
            let metrics = Entries {
                start,
                end: t.metrics.len() as u32,
            };
            let extras = t.push_extras(SpanExtras {
                meta_struct: d.meta_struct,
                span_links: d.span_links,
                span_events: d.span_events,
            });
            t.spans.push(Span {
                trace_id: d.trace_id,
                span_id: d.span_id,
                parent_id: d.parent_id,
                name,
                service,
                resource,
                r#type,
                start: d.start,
                duration: d.duration,
                error: d.error,
                meta,
                metrics,
                extras,
            });
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_hint_reserves_like_the_last_trace_within_a_cap() {
        let hint = SizeHint::new();
        let mut t = Trace::default();
        hint.reserve(&mut t, 10);
        assert_eq!(t.text.capacity(), 0, "no hint before the first trace");
        let small = Trace::from(vec![
            SpanData {
                name: "n".repeat(100),
                ..Default::default()
            };
            4
        ]);
        hint.learn(&small);
        let mut t = Trace::default();
        hint.reserve(&mut t, 8);
        assert!(t.text.capacity() >= 8 * 100, "{}", t.text.capacity());
        // One span with a huge string, then a trace of many small spans:
        // the reservation stays within the cap.
        let huge = Trace::from(vec![SpanData {
            name: "n".repeat(4 << 20),
            ..Default::default()
        }]);
        hint.learn(&huge);
        let mut t = Trace::default();
        hint.reserve(&mut t, 1_000);
        assert!(
            t.text.capacity() <= 2 * SizeHint::MAX_RESERVE,
            "{}",
            t.text.capacity()
        );
    }

    #[test]
    fn recycled_traces_are_emptied_with_their_storage() {
        let pool: Recycler<Trace> = Recycler::new(1 << 20);
        let span = SpanData {
            name: "n".repeat(100),
            meta: vec![("k".into(), "v".into())],
            metrics: vec![("m".into(), 1.0)],
            ..Default::default()
        };
        let t = Trace::from(vec![span; 3]);
        let text = t.text.as_ptr();
        pool.give([t]);
        let t = pool.take().unwrap();
        assert_eq!(t.text.as_ptr(), text);
        assert!(t.text.is_empty() && t.spans.is_empty() && t.meta.is_empty());
        assert!(t.metrics.is_empty() && t.extras.is_empty());
        assert!(t.spans.capacity() >= 3 && t.text.capacity() >= 300);
    }

    fn meta_of(v: &SpanView<'_>) -> Vec<(String, String)> {
        v.own_meta()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .chain(
                v.extra_meta()
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.into_owned())),
            )
            .collect()
    }

    #[test]
    fn strings_and_entries_round_trip() {
        let t = Trace::from(vec![SpanData {
            name: "n".into(),
            resource: "r".into(),
            meta: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
            metrics: vec![("m".into(), 1.5)],
            ..Default::default()
        }]);
        let d = SpanDefaults::default();
        let v = t.views(&d).next().unwrap();
        assert_eq!(v.name(), "n");
        assert_eq!(v.resource(), "r");
        assert_eq!(
            meta_of(&v),
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(v.metrics().collect::<Vec<_>>(), vec![("m", 1.5)]);
    }

    #[test]
    fn high_trace_id_bits_go_to_first_span_meta() {
        let tid = (0xabcd_u128 << 64) | 42;
        let t = Trace::from(vec![
            SpanData {
                trace_id: tid,
                name: "a".into(),
                ..Default::default()
            },
            SpanData {
                trace_id: tid,
                name: "b".into(),
                ..Default::default()
            },
        ]);
        let d = SpanDefaults::default();
        let views: Vec<_> = t.views(&d).collect();
        assert_eq!(
            meta_of(&views[0]),
            vec![(TRACE_ID_HIGH_TAG.into(), "000000000000abcd".into())]
        );
        assert!(meta_of(&views[1]).is_empty());
        assert_eq!(views[0].trace_id_low(), 42);
    }

    #[test]
    fn defaults_fill_only_what_is_missing() {
        let defaults = SpanDefaults {
            service: "svc".into(),
            env: "prod".into(),
            version: "1.2".into(),
        };
        let t = Trace::from(vec![
            SpanData {
                name: "n".into(),
                ..Default::default()
            },
            SpanData {
                name: "m".into(),
                service: "other".into(),
                resource: "r".into(),
                meta: vec![("env".into(), "staging".into())],
                ..Default::default()
            },
        ]);
        let views: Vec<_> = t.views(&defaults).collect();
        assert_eq!(views[0].service(), "svc");
        assert_eq!(views[0].resource(), "n");
        assert_eq!(
            meta_of(&views[0]),
            vec![
                ("env".into(), "prod".into()),
                ("version".into(), "1.2".into())
            ]
        );
        assert_eq!(views[1].service(), "other");
        assert_eq!(views[1].resource(), "r");
        assert_eq!(meta_of(&views[1]), vec![("env".into(), "staging".into())]);
    }
}
