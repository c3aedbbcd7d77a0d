//! Agent payload encoders (msgpack, v0.4 and v0.5).
//!
//! Each encoder turns traces into the body of one `POST /v0.X/traces`. The
//! splitter (`crate::split`) decides which traces share a body, so encoders
//! expose both a whole-payload function and the per-trace pieces it needs.

pub mod msgpack;
pub mod v04;
pub mod v05;

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::span::{AttributeValue, SpanEvent, SpanLink};

/// A JSON object with one text entry, `{"<name>": "<text>"}`: the
/// intake's `{"key": ..}` and `{"message": ..}` wrappers.
pub(crate) struct One<'a>(pub &'static str, pub &'a str);

impl Serialize for One<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(self.0, self.1)?;
        m.end()
    }
}

/// A slice serialized as a sequence, each item as `wrap` presents it.
pub(crate) struct SeqOf<'a, T, W>(pub &'a [T], pub fn(&'a T) -> W);

impl<'a, T, W: Serialize> Serialize for SeqOf<'a, T, W> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for item in self.0 {
            seq.serialize_element(&(self.1)(item))?;
        }
        seq.end()
    }
}

/// `(name, value)` pairs serialized as a map, each value as `wrap`
/// presents it.
pub(crate) struct MapOf<'a, T, W>(pub &'a [(String, T)], pub fn(&'a T) -> W);

impl<'a, T, W: Serialize> Serialize for MapOf<'a, T, W> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, &(self.1)(v))?;
        }
        m.end()
    }
}

/// The agent API version a transport speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V04,
    V05,
}

impl Protocol {
    /// The request path for this protocol.
    pub fn path(self) -> &'static str {
        match self {
            Protocol::V04 => "/v0.4/traces",
            Protocol::V05 => "/v0.5/traces",
        }
    }

    /// Parses `"v04"`/`"v0.4"` and `"v05"`/`"v0.5"`.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "v04" | "v0.4" => Some(Protocol::V04),
            "v05" | "v0.5" => Some(Protocol::V05),
            _ => None,
        }
    }
}

/// Size in bytes of the smallest msgpack array header for `len` elements.
pub(crate) fn container_header_len(len: usize) -> usize {
    if len < 16 {
        1
    } else if len <= u16::MAX as usize {
        3
    } else {
        5
    }
}

/// Writes a msgpack array header into `buf`.
pub(crate) fn write_array_len(buf: &mut Vec<u8>, len: usize) {
    msgpack::array_len(buf, len);
}

/// Span links in the JSON form the agent reads from meta `_dd.span_links`
/// (used where the wire format has no native field, i.e. v0.5).
pub(crate) fn span_links_json(links: &[SpanLink]) -> String {
    let list: Vec<serde_json::Value> = links
        .iter()
        .map(|l| {
            let mut o = serde_json::Map::new();
            o.insert("trace_id".into(), format!("{:032x}", l.trace_id).into());
            o.insert("span_id".into(), format!("{:016x}", l.span_id).into());
            if !l.attributes.is_empty() {
                let attrs: serde_json::Map<String, serde_json::Value> = l
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into()))
                    .collect();
                o.insert("attributes".into(), attrs.into());
            }
            if !l.tracestate.is_empty() {
                o.insert("tracestate".into(), l.tracestate.clone().into());
            }
            if l.flags != 0 {
                o.insert("flags".into(), l.flags.into());
            }
            o.into()
        })
        .collect();
    serde_json::Value::Array(list).to_string()
}

/// Span events in the JSON form the agent reads from meta `events`.
pub(crate) fn span_events_json(events: &[SpanEvent]) -> String {
    fn attr(v: &AttributeValue) -> serde_json::Value {
        match v {
            AttributeValue::String(s) => s.clone().into(),
            AttributeValue::Bool(b) => (*b).into(),
            AttributeValue::Int(i) => (*i).into(),
            AttributeValue::Float(f) => (*f).into(),
            AttributeValue::Array(a) => a.iter().map(attr).collect(),
        }
    }
    let list: Vec<serde_json::Value> = events
        .iter()
        .map(|e| {
            let mut o = serde_json::Map::new();
            o.insert("name".into(), e.name.clone().into());
            o.insert("time_unix_nano".into(), e.time_unix_nano.into());
            if !e.attributes.is_empty() {
                let attrs: serde_json::Map<String, serde_json::Value> = e
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), attr(v)))
                    .collect();
                o.insert("attributes".into(), attrs.into());
            }
            o.into()
        })
        .collect();
    serde_json::Value::Array(list).to_string()
}
