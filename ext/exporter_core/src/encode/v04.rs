//! v0.4: an array of traces, each an array of span maps.
//!
//! Optional fields (`type`, `meta`, `metrics`,
//! `meta_struct`, `span_links`, `span_events`) are left out when empty, as
//! the agent treats a missing field as its zero value.

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::{msgpack, write_array_len, MapOf, SeqOf};
use crate::span::{AttributeValue, SpanDefaults, SpanEvent, SpanLink, SpanView, Trace};
use crate::split::Payload;

/// Encodes one trace (an array of span maps) and appends it to `buf`.
pub fn encode_trace(buf: &mut Vec<u8>, trace: &Trace, defaults: &SpanDefaults) {
    write_array_len(buf, trace.len());
    for view in trace.views(defaults) {
        write_span(buf, &view);
    }
}

/// Writes a short map key (a msgpack fixstr: every key here is under 32
/// bytes).
#[inline(always)]
fn key(buf: &mut Vec<u8>, k: &str) {
    debug_assert!(k.len() < 32);
    buf.push(0xa0 | k.len() as u8);
    buf.extend_from_slice(k.as_bytes());
}

#[inline(always)]
fn str_value(buf: &mut Vec<u8>, v: &str) {
    msgpack::str(buf, v);
}

/// One span map. The fields every span has are written with `rmp`
/// directly (this is the hot path of every export); the rare nested ones
/// (meta_struct, span links, span events) go through their serde impls.
fn write_span(buf: &mut Vec<u8>, view: &SpanView<'_>) {
    let sp = view.span;
    let rare = view.extras();
    let extra = view.extra_meta();
    let has_meta = !sp.meta.is_empty() || !extra.is_empty();
    // trace_id span_id parent_id name service resource start duration
    // error, then the optional fields that are present.
    let len = 9
        + usize::from(!sp.r#type.is_empty())
        + usize::from(has_meta)
        + usize::from(!sp.metrics.is_empty())
        + usize::from(!rare.meta_struct.is_empty())
        + usize::from(!rare.span_links.is_empty())
        + usize::from(!rare.span_events.is_empty());
    msgpack::map_len(buf, len);
    key(buf, "trace_id");
    msgpack::uint(buf, view.trace_id_low());
    key(buf, "span_id");
    msgpack::uint(buf, sp.span_id);
    key(buf, "parent_id");
    msgpack::uint(buf, sp.parent_id);
    key(buf, "name");
    str_value(buf, view.name());
    key(buf, "service");
    str_value(buf, view.service());
    key(buf, "resource");
    str_value(buf, view.resource());
    if !sp.r#type.is_empty() {
        key(buf, "type");
        str_value(buf, view.r#type());
    }
    key(buf, "start");
    msgpack::sint(buf, sp.start);
    key(buf, "duration");
    msgpack::sint(buf, sp.duration);
    key(buf, "error");
    msgpack::sint(buf, sp.error.into());
    if has_meta {
        key(buf, "meta");
        msgpack::map_len(buf, sp.meta.len() + extra.len());
        for (k, v) in view.own_meta() {
            str_value(buf, k);
            str_value(buf, v);
        }
        for (k, v) in &extra {
            str_value(buf, k);
            str_value(buf, v);
        }
    }
    if !sp.metrics.is_empty() {
        key(buf, "metrics");
        msgpack::map_len(buf, sp.metrics.len());
        for (k, v) in view.metrics() {
            str_value(buf, k);
            msgpack::f64(buf, v);
        }
    }
    let mut ser = rmp_serde::Serializer::new(&mut *buf);
    if !rare.meta_struct.is_empty() {
        key(ser.get_mut(), "meta_struct");
        let _ = MapOf(&rare.meta_struct, |v| Bin(v)).serialize(&mut ser);
    }
    if !rare.span_links.is_empty() {
        key(ser.get_mut(), "span_links");
        let _ = SeqOf(&rare.span_links, Link).serialize(&mut ser);
    }
    if !rare.span_events.is_empty() {
        key(ser.get_mut(), "span_events");
        let _ = SeqOf(&rare.span_events, Event).serialize(&mut ser);
    }
}

/// Builds one v0.4 body trace by trace, in a single buffer, so that the
/// splitter can stop before a body crosses its size cap. The outer array
/// header is written in its 5-byte form (valid msgpack for any count) and
/// filled in by `finish`, so traces are encoded in place, never copied.
#[derive(Debug)]
pub struct PayloadBuilder {
    body: Vec<u8>,
    trace_count: usize,
}

const HEADER_LEN: usize = 5;

impl Default for PayloadBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PayloadBuilder {
    pub fn new() -> PayloadBuilder {
        PayloadBuilder::with_buffer(Vec::with_capacity(64 * 1024))
    }

    /// A builder writing into `buf` (cleared first), keeping its capacity.
    pub fn with_buffer(mut buf: Vec<u8>) -> PayloadBuilder {
        buf.clear();
        buf.extend_from_slice(&[0xdd, 0, 0, 0, 0]);
        PayloadBuilder {
            body: buf,
            trace_count: 0,
        }
    }

    pub fn trace_count(&self) -> usize {
        self.trace_count
    }

    /// Adds a trace if the body stays within `cap` bytes; when not, the
    /// builder is unchanged.
    pub fn try_add(&mut self, trace: &Trace, defaults: &SpanDefaults, cap: usize) -> bool {
        let before = self.body.len();
        encode_trace(&mut self.body, trace, defaults);
        if self.body.len() > cap {
            self.body.truncate(before);
            return false;
        }
        self.trace_count += 1;
        true
    }

    pub fn finish(mut self) -> Payload {
        let n = self.trace_count as u32;
        self.body[1..HEADER_LEN].copy_from_slice(&n.to_be_bytes());
        Payload {
            body: self.body,
            trace_count: self.trace_count,
        }
    }
}

/// Encodes traces into one v0.4 payload.
pub fn encode(traces: &[Trace], defaults: &SpanDefaults) -> Vec<u8> {
    let mut b = PayloadBuilder::new();
    for t in traces {
        b.try_add(t, defaults, usize::MAX);
    }
    b.finish().body
}

struct Bin<'a>(&'a [u8]);

impl Serialize for Bin<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

struct Link<'a>(&'a SpanLink);

impl Serialize for Link<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let l = self.0;
        let high = (l.trace_id >> 64) as u64;
        let len = 2
            + usize::from(high != 0)
            + usize::from(!l.attributes.is_empty())
            + usize::from(!l.tracestate.is_empty())
            + usize::from(l.flags != 0);
        let mut m = s.serialize_map(Some(len))?;
        m.serialize_entry("trace_id", &(l.trace_id as u64))?;
        if high != 0 {
            m.serialize_entry("trace_id_high", &high)?;
        }
        m.serialize_entry("span_id", &l.span_id)?;
        if !l.attributes.is_empty() {
            m.serialize_entry("attributes", &MapOf(&l.attributes, |v| v))?;
        }
        if !l.tracestate.is_empty() {
            m.serialize_entry("tracestate", &l.tracestate)?;
        }
        if l.flags != 0 {
            m.serialize_entry("flags", &l.flags)?;
        }
        m.end()
    }
}

struct Event<'a>(&'a SpanEvent);

impl Serialize for Event<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut m = s.serialize_map(Some(2 + usize::from(!e.attributes.is_empty())))?;
        m.serialize_entry("name", &e.name)?;
        m.serialize_entry("time_unix_nano", &e.time_unix_nano)?;
        if !e.attributes.is_empty() {
            m.serialize_entry("attributes", &MapOf(&e.attributes, Attr))?;
        }
        m.end()
    }
}

/// The agent's typed attribute value: `{"type": N, "<kind>_value": v}`.
struct Attr<'a>(&'a AttributeValue);

impl Serialize for Attr<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        match self.0 {
            AttributeValue::String(v) => {
                m.serialize_entry("type", &0u8)?;
                m.serialize_entry("string_value", v)?;
            }
            AttributeValue::Bool(v) => {
                m.serialize_entry("type", &1u8)?;
                m.serialize_entry("bool_value", v)?;
            }
            AttributeValue::Int(v) => {
                m.serialize_entry("type", &2u8)?;
                m.serialize_entry("int_value", v)?;
            }
            AttributeValue::Float(v) => {
                m.serialize_entry("type", &3u8)?;
                m.serialize_entry("double_value", v)?;
            }
            AttributeValue::Array(items) => {
                m.serialize_entry("type", &4u8)?;
                m.serialize_entry("array_value", &ArrayValue(items))?;
            }
        }
        m.end()
    }
}

/// `{"values": [typed values]}`.
struct ArrayValue<'a>(&'a [AttributeValue]);

impl Serialize for ArrayValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("values", &SeqOf(self.0, Attr))?;
        m.end()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::span::SpanData;
    use rmpv::Value;

    fn get<'a>(map: &'a Value, key: &str) -> Option<&'a Value> {
        map.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    pub(crate) fn sample_span() -> SpanData {
        SpanData {
            trace_id: (7u128 << 64) | 1,
            span_id: 2,
            parent_id: 3,
            name: "rack.request".into(),
            service: "web".into(),
            resource: "GET /".into(),
            r#type: "web".into(),
            start: 1_700_000_000_000_000_000,
            duration: 12_345,
            error: 1,
            meta: vec![("http.method".into(), "GET".into())],
            metrics: vec![("_sampling_priority_v1".into(), 1.0)],
            meta_struct: vec![("appsec".into(), vec![0x81, 0xa1, b'a', 0x01])],
            span_links: vec![SpanLink {
                trace_id: (5u128 << 64) | 9,
                span_id: 10,
                attributes: vec![("k".into(), "v".into())],
                tracestate: "dd=s:1".into(),
                flags: 1,
            }],
            span_events: vec![SpanEvent {
                name: "exception".into(),
                time_unix_nano: 99,
                attributes: vec![
                    ("message".into(), AttributeValue::String("boom".into())),
                    (
                        "list".into(),
                        AttributeValue::Array(vec![AttributeValue::Int(1)]),
                    ),
                ],
            }],
        }
    }

    #[test]
    fn decodes_what_it_encoded() {
        let span = sample_span();
        let payload = encode(
            &[Trace::from(vec![span.clone()]), Trace::default()],
            &SpanDefaults::default(),
        );
        let v = rmpv::decode::read_value(&mut payload.as_slice()).unwrap();
        let traces = v.as_array().unwrap();
        assert_eq!(traces.len(), 2);
        assert!(traces[1].as_array().unwrap().is_empty());
        let s = &traces[0].as_array().unwrap()[0];
        // 9 fixed fields, type, meta (own + _dd.p.tid), metrics,
        // meta_struct, span_links, span_events.
        assert_eq!(s.as_map().unwrap().len(), 15);
        assert_eq!(
            get(get(s, "meta").unwrap(), "_dd.p.tid").unwrap().as_str(),
            Some("0000000000000007")
        );
        assert_eq!(get(s, "trace_id").unwrap().as_u64(), Some(1));
        assert_eq!(get(s, "span_id").unwrap().as_u64(), Some(2));
        assert_eq!(get(s, "parent_id").unwrap().as_u64(), Some(3));
        assert_eq!(get(s, "name").unwrap().as_str(), Some("rack.request"));
        assert_eq!(get(s, "type").unwrap().as_str(), Some("web"));
        assert_eq!(get(s, "start").unwrap().as_i64(), Some(span.start));
        assert_eq!(get(s, "duration").unwrap().as_i64(), Some(12_345));
        assert_eq!(get(s, "error").unwrap().as_i64(), Some(1));
        assert_eq!(
            get(get(s, "meta").unwrap(), "http.method")
                .unwrap()
                .as_str(),
            Some("GET")
        );
        assert_eq!(
            get(get(s, "metrics").unwrap(), "_sampling_priority_v1")
                .unwrap()
                .as_f64(),
            Some(1.0)
        );
        let ms = get(get(s, "meta_struct").unwrap(), "appsec").unwrap();
        assert_eq!(ms.as_slice(), Some(&[0x81, 0xa1, b'a', 0x01][..]));
        let link = &get(s, "span_links").unwrap().as_array().unwrap()[0];
        assert_eq!(get(link, "trace_id").unwrap().as_u64(), Some(9));
        assert_eq!(get(link, "trace_id_high").unwrap().as_u64(), Some(5));
        assert_eq!(get(link, "flags").unwrap().as_u64(), Some(1));
        let ev = &get(s, "span_events").unwrap().as_array().unwrap()[0];
        let msg = get(get(ev, "attributes").unwrap(), "message").unwrap();
        assert_eq!(get(msg, "type").unwrap().as_u64(), Some(0));
        assert_eq!(get(msg, "string_value").unwrap().as_str(), Some("boom"));
    }

    #[test]
    fn minimal_span_leaves_out_empty_fields() {
        let span = SpanData {
            trace_id: 1,
            span_id: 1,
            name: "n".into(),
            ..Default::default()
        };
        let payload = encode(&[Trace::from(vec![span])], &SpanDefaults::default());
        let v = rmpv::decode::read_value(&mut payload.as_slice()).unwrap();
        let s = &v.as_array().unwrap()[0].as_array().unwrap()[0];
        let keys: Vec<&str> = s
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "trace_id",
                "span_id",
                "parent_id",
                "name",
                "service",
                "resource",
                "start",
                "duration",
                "error"
            ]
        );
    }
}
