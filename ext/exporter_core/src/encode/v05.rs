//! v0.5: `[strings, traces]` where every string is an index into `strings`.
//!
//! Each span is the 12-element array `[service, name, resource, trace_id,
//! span_id, parent_id, start, duration, error, meta, metrics, type]`. The
//! format has no field for span links, span events or meta_struct: links and
//! events travel as JSON in meta (`_dd.span_links`, `events`), as tracers do
//! for agents without native support; meta_struct cannot be carried and is
//! left out (use v0.4 for AppSec payloads).

use std::collections::HashMap;

use super::msgpack::{self, str_len};
use super::{container_header_len, span_events_json, span_links_json, write_array_len};
use crate::span::{SpanDefaults, SpanView, Trace};

/// Builds one v0.5 payload trace by trace, so that the splitter can stop
/// before a payload crosses its size cap.
#[derive(Debug)]
pub struct Builder {
    strings: Vec<String>,
    index: HashMap<String, u32>,
    /// Encoded size of the string table entries (without its header).
    strings_len: usize,
    traces: Vec<u8>,
    trace_count: usize,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    pub fn new() -> Builder {
        let mut b = Builder {
            strings: Vec::new(),
            index: HashMap::new(),
            strings_len: 0,
            traces: Vec::new(),
            trace_count: 0,
        };
        b.intern("");
        b
    }

    /// Number of traces added so far.
    pub fn trace_count(&self) -> usize {
        self.trace_count
    }

    /// The exact size `finish` would produce now.
    pub fn encoded_len(&self) -> usize {
        1 + container_header_len(self.strings.len())
            + self.strings_len
            + container_header_len(self.trace_count)
            + self.traces.len()
    }

    /// Adds a trace if the payload stays within `cap` bytes (or if it is the
    /// first trace and `cap` is `None`). Returns whether it was added; when
    /// not, the builder is unchanged.
    pub fn try_add(&mut self, trace: &Trace, defaults: &SpanDefaults, cap: Option<usize>) -> bool {
        let strings_before = self.strings.len();
        let strings_len_before = self.strings_len;
        let traces_before = self.traces.len();
        let mut buf = std::mem::take(&mut self.traces);
        self.encode_trace(&mut buf, trace, defaults);
        self.traces = buf;
        self.trace_count += 1;
        if cap.is_some_and(|cap| self.encoded_len() > cap) {
            for s in self.strings.drain(strings_before..) {
                self.index.remove(&s);
            }
            self.strings_len = strings_len_before;
            self.traces.truncate(traces_before);
            self.trace_count -= 1;
            return false;
        }
        true
    }

    /// The finished payload.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        write_array_len(&mut out, 2);
        write_array_len(&mut out, self.strings.len());
        for s in &self.strings {
            msgpack::str(&mut out, s);
        }
        write_array_len(&mut out, self.trace_count);
        out.extend_from_slice(&self.traces);
        out
    }

    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.strings.len() as u32;
        self.strings_len += str_len(s);
        self.strings.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }

    fn uint(buf: &mut Vec<u8>, v: u64) {
        msgpack::uint(buf, v);
    }

    fn encode_trace(&mut self, buf: &mut Vec<u8>, trace: &Trace, defaults: &SpanDefaults) {
        write_array_len(buf, trace.len());
        for view in trace.views(defaults) {
            self.encode_span(buf, &view);
        }
    }

    fn encode_span(&mut self, buf: &mut Vec<u8>, view: &SpanView<'_>) {
        let sp = view.span;
        write_array_len(buf, 12);
        for s in [view.service(), view.name(), view.resource()] {
            let i = self.intern(s);
            Self::uint(buf, i.into());
        }
        Self::uint(buf, view.trace_id_low());
        Self::uint(buf, sp.span_id);
        Self::uint(buf, sp.parent_id);
        msgpack::sint(buf, sp.start);
        msgpack::sint(buf, sp.duration);
        msgpack::sint(buf, sp.error.into());

        let rare = view.extras();
        let links = (!rare.span_links.is_empty()).then(|| span_links_json(&rare.span_links));
        let events = (!rare.span_events.is_empty()).then(|| span_events_json(&rare.span_events));
        let derived = view.extra_meta();
        let extra = usize::from(links.is_some()) + usize::from(events.is_some()) + derived.len();
        msgpack::map_len(buf, sp.meta.len() + extra);
        let extras = [("_dd.span_links", links), ("events", events)];
        let extras = extras
            .iter()
            .filter_map(|(k, v)| v.as_deref().map(|v| (*k, v)));
        let derived = derived.iter().map(|(k, v)| (*k, v.as_ref()));
        for (k, v) in view.own_meta().chain(derived).chain(extras) {
            let k = self.intern(k);
            let v = self.intern(v);
            Self::uint(buf, k.into());
            Self::uint(buf, v.into());
        }
        msgpack::map_len(buf, sp.metrics.len());
        for (k, v) in view.metrics() {
            let k = self.intern(k);
            Self::uint(buf, k.into());
            msgpack::f64(buf, v);
        }
        let t = self.intern(view.r#type());
        Self::uint(buf, t.into());
    }
}

/// Encodes traces into one v0.5 payload.
pub fn encode(traces: &[Trace], defaults: &SpanDefaults) -> Vec<u8> {
    let mut b = Builder::new();
    for t in traces {
        b.try_add(t, defaults, None);
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn decode(payload: &[u8]) -> (Vec<String>, Vec<Value>) {
        let v = rmpv::decode::read_value(&mut &payload[..]).unwrap();
        let top = v.as_array().unwrap();
        let strings = top[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect();
        (strings, top[1].as_array().unwrap().clone())
    }

    #[test]
    fn decodes_what_it_encoded() {
        let mut span = crate::encode::v04::tests::sample_span();
        span.meta_struct.clear();
        let d = SpanDefaults::default();
        let trace = Trace::from(vec![span.clone(), span.clone()]);
        let payload = encode(std::slice::from_ref(&trace), &d);
        assert_eq!(payload.len(), {
            let mut b = Builder::new();
            b.try_add(&trace, &d, None);
            b.encoded_len()
        });
        let (strings, traces) = decode(&payload);
        assert_eq!(strings[0], "");
        let spans = traces[0].as_array().unwrap();
        assert_eq!(spans.len(), 2);
        let s = spans[0].as_array().unwrap();
        assert_eq!(s.len(), 12);
        let st = |v: &Value| strings[v.as_u64().unwrap() as usize].clone();
        assert_eq!(st(&s[0]), "web");
        assert_eq!(st(&s[1]), "rack.request");
        assert_eq!(st(&s[2]), "GET /");
        assert_eq!(s[3].as_u64(), Some(1));
        assert_eq!(s[4].as_u64(), Some(2));
        assert_eq!(s[5].as_u64(), Some(3));
        assert_eq!(s[6].as_i64(), Some(span.start));
        assert_eq!(s[7].as_i64(), Some(12_345));
        assert_eq!(s[8].as_i64(), Some(1));
        let meta: Vec<(String, String)> = s[9]
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, v)| (st(k), st(v)))
            .collect();
        assert_eq!(meta[0], ("http.method".into(), "GET".into()));
        assert_eq!(meta[1], ("_dd.p.tid".into(), "0000000000000007".into()));
        assert_eq!(meta[2].0, "_dd.span_links");
        assert!(meta[2].1.contains("\"tracestate\":\"dd=s:1\""));
        assert_eq!(meta[3].0, "events");
        let metrics = s[10].as_map().unwrap();
        assert_eq!(st(&metrics[0].0), "_sampling_priority_v1");
        assert_eq!(metrics[0].1.as_f64(), Some(1.0));
        assert_eq!(st(&s[11]), "web");
        // Strings are shared, not repeated.
        assert_eq!(strings.iter().filter(|s| *s == "rack.request").count(), 1);
    }

    #[test]
    fn try_add_over_cap_leaves_builder_unchanged() {
        let span = crate::encode::v04::tests::sample_span();
        let d = SpanDefaults::default();
        let mut b = Builder::new();
        assert!(b.try_add(&Trace::from(vec![span.clone()]), &d, Some(10_000)));
        let len = b.encoded_len();
        let mut big = span.clone();
        big.resource = "x".repeat(20_000);
        assert!(!b.try_add(&Trace::from(vec![big]), &d, Some(10_000)));
        assert_eq!(b.encoded_len(), len);
        assert_eq!(b.trace_count(), 1);
        let payload = b.finish();
        assert_eq!(payload.len(), len);
        let (strings, traces) = decode(&payload);
        assert_eq!(traces.len(), 1);
        assert!(strings.iter().all(|s| s.len() < 1000));
    }
}
