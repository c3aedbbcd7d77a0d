//! The span model: what a Ruby span Hash becomes once converted.
//!
//! Owned, `Send` and Ruby-free, so that everything after conversion
//! (normalisation, encoding, batching, HTTP) can run without the GVL on any
//! thread. Field meanings follow the agent's v0.4 span map.

/// One trace: the spans of one trace id, in the order they were given.
pub type Trace = Vec<Span>;

/// The meta key that carries the high 64 bits of a 128-bit trace id.
pub const TRACE_ID_HIGH_TAG: &str = "_dd.p.tid";

/// A span, as sent to the agent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Span {
    /// Full 128-bit trace id; only the low 64 bits go in `trace_id` on the wire.
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: u64,
    pub name: String,
    pub service: String,
    pub resource: String,
    pub r#type: String,
    /// Start, nanoseconds since the Unix epoch.
    pub start: i64,
    /// Duration in nanoseconds.
    pub duration: i64,
    pub error: i32,
    pub meta: Vec<(String, String)>,
    pub metrics: Vec<(String, f64)>,
    /// Values already encoded as msgpack.
    pub meta_struct: Vec<(String, Vec<u8>)>,
    pub span_links: Vec<SpanLink>,
    pub span_events: Vec<SpanEvent>,
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

impl Span {
    /// The low 64 bits of the trace id, as sent in the span's `trace_id`.
    pub fn trace_id_low(&self) -> u64 {
        self.trace_id as u64
    }

    fn meta_get(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn meta_set_default(&mut self, key: &str, value: &str) {
        if self.meta_get(key).is_none() {
            self.meta.push((key.to_owned(), value.to_owned()));
        }
    }
}

/// Process-level context applied to every span that lacks it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanDefaults {
    pub service: String,
    pub env: String,
    pub version: String,
}

/// Prepares a converted trace for the wire:
/// - a 128-bit trace id puts its high 64 bits, as 16 hex digits, in meta
///   `_dd.p.tid` of the first span (unless the caller already set it);
/// - an empty `service` takes the default service; an empty `resource`
///   takes the span's name;
/// - `env` is added to every span's meta and `version` to the spans of the
///   default service, when configured and not already present.
pub fn normalize_trace(trace: &mut Trace, defaults: &SpanDefaults) {
    if let Some(first) = trace.first_mut() {
        let high = (first.trace_id >> 64) as u64;
        if high != 0 {
            first.meta_set_default(TRACE_ID_HIGH_TAG, &format!("{high:016x}"));
        }
    }
    for span in trace.iter_mut() {
        if span.service.is_empty() {
            span.service.clone_from(&defaults.service);
        }
        if span.resource.is_empty() {
            span.resource.clone_from(&span.name);
        }
        if !defaults.env.is_empty() {
            span.meta_set_default("env", &defaults.env);
        }
        if !defaults.version.is_empty() && span.service == defaults.service {
            span.meta_set_default("version", &defaults.version);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_trace_id_bits_go_to_first_span_meta() {
        let tid = (0xabcd_u128 << 64) | 42;
        let mut trace = vec![
            Span {
                trace_id: tid,
                name: "a".into(),
                ..Default::default()
            },
            Span {
                trace_id: tid,
                name: "b".into(),
                ..Default::default()
            },
        ];
        normalize_trace(&mut trace, &SpanDefaults::default());
        assert_eq!(
            trace[0].meta_get(TRACE_ID_HIGH_TAG),
            Some("000000000000abcd")
        );
        assert_eq!(trace[1].meta_get(TRACE_ID_HIGH_TAG), None);
        assert_eq!(trace[0].trace_id_low(), 42);
    }

    #[test]
    fn defaults_fill_only_what_is_missing() {
        let defaults = SpanDefaults {
            service: "svc".into(),
            env: "prod".into(),
            version: "1.2".into(),
        };
        let mut trace = vec![
            Span {
                name: "n".into(),
                ..Default::default()
            },
            Span {
                name: "m".into(),
                service: "other".into(),
                resource: "r".into(),
                meta: vec![("env".into(), "staging".into())],
                ..Default::default()
            },
        ];
        normalize_trace(&mut trace, &defaults);
        assert_eq!(trace[0].service, "svc");
        assert_eq!(trace[0].resource, "n");
        assert_eq!(trace[0].meta_get("env"), Some("prod"));
        assert_eq!(trace[0].meta_get("version"), Some("1.2"));
        assert_eq!(trace[1].service, "other");
        assert_eq!(trace[1].resource, "r");
        assert_eq!(trace[1].meta_get("env"), Some("staging"));
        assert_eq!(trace[1].meta_get("version"), None);
    }
}
