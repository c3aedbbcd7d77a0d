//! JSON bodies of flag-evaluation rows, each under the intake's cap.
//!
//! A body is `{"context":{service,env,version},"flagEvaluations":[row...]}`
//! (the service context is the exposures' [`Context`]). A row carries
//! `timestamp` (the flush time), `flag`, `first_evaluation`,
//! `last_evaluation`, `evaluation_count` and, when present, `variant`,
//! `allocation`, `targeting_key`, `context.evaluation`, `error.message` and
//! `runtime_default_used: true`; absent fields are left out, never null.
//!
//! [`next_body`] encodes one body at a time, just before it is sent. A row
//! that alone does not fit is degraded in place (no targeting key, no
//! context) and tried again; if it still does not fit it is dropped (the
//! caller counts its evaluations).

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::aggregate::Row;
use super::context::{Canonical, ScalarRef};
use crate::encode::One;
use crate::exposures::Context;

impl Serialize for ScalarRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            ScalarRef::Str(v) => s.serialize_str(v),
            ScalarRef::Int(v) => s.serialize_i64(v),
            ScalarRef::Float(v) => s.serialize_f64(v),
            ScalarRef::Bool(v) => s.serialize_bool(v),
        }
    }
}

/// `{"evaluation":{flat map}}`
struct EvaluationContext<'a>(&'a Canonical);

impl Serialize for EvaluationContext<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Flat<'a>(&'a Canonical);
        impl Serialize for Flat<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.fields())
            }
        }
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("evaluation", &Flat(self.0))?;
        m.end()
    }
}

/// A row as sent at `timestamp` (ms).
pub struct RowAt<'a> {
    pub row: &'a Row,
    pub timestamp: i64,
}

impl Serialize for RowAt<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let k = &self.row.key;
        let c = &self.row.counts;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("timestamp", &self.timestamp)?;
        m.serialize_entry("flag", &One("key", &k.flag))?;
        m.serialize_entry("first_evaluation", &c.first)?;
        m.serialize_entry("last_evaluation", &c.last)?;
        m.serialize_entry("evaluation_count", &c.count)?;
        match &k.variant {
            Some(v) => m.serialize_entry("variant", &One("key", v))?,
            None => m.serialize_entry("runtime_default_used", &true)?,
        }
        if let Some(a) = &k.allocation {
            m.serialize_entry("allocation", &One("key", a))?;
        }
        if let Some(t) = &k.targeting_key {
            m.serialize_entry("targeting_key", t)?;
        }
        if !k.context.is_empty() {
            m.serialize_entry("context", &EvaluationContext(&k.context))?;
        }
        if let Some(e) = &k.error {
            m.serialize_entry("error", &One("message", e))?;
        }
        m.end()
    }
}

/// The part of every body before its first row.
pub fn head(context: &Context) -> Vec<u8> {
    let mut head = b"{\"context\":".to_vec();
    // Serialising strings cannot fail.
    let _ = serde_json::to_writer(&mut head, context);
    head.extend_from_slice(b",\"flagEvaluations\":[");
    head
}

const TAIL: &[u8] = b"]}";

/// One body, made from `rows[start..end]`.
#[derive(Debug, Default)]
pub struct Body {
    /// `None` when no row of the range could be sent.
    pub bytes: Option<Vec<u8>>,
    /// Rows consumed: `start..end`.
    pub end: usize,
    /// Rows of the range degraded to fit (sent degraded).
    pub degraded: Vec<usize>,
    /// Rows of the range that do not fit even degraded (not sent).
    pub dropped: Vec<usize>,
}

impl Body {
    /// Whether row `i` of its range is in the body (when there is one).
    pub fn holds(&self, i: usize) -> bool {
        !self.dropped.contains(&i)
    }
}

fn write_row(buf: &mut Vec<u8>, row: &Row, timestamp: i64) {
    // Rows hold strings and numbers only: serialising cannot fail.
    let _ = serde_json::to_writer(buf, &RowAt { row, timestamp });
}

/// The next body from `rows[start..]`, at most `cap` bytes, written into
/// `buf` (cleared first; pass the last body's buffer to reuse it).
pub fn next_body(
    head: &[u8],
    rows: &mut [Row],
    start: usize,
    timestamp: i64,
    cap: usize,
    mut buf: Vec<u8>,
) -> Body {
    buf.clear();
    buf.extend_from_slice(head);
    let mut out = Body {
        end: start,
        ..Body::default()
    };
    let mut count = 0;
    for (i, row) in rows.iter_mut().enumerate().skip(start) {
        let before = buf.len();
        if count > 0 {
            buf.push(b',');
        }
        write_row(&mut buf, row, timestamp);
        if buf.len() + TAIL.len() <= cap {
            count += 1;
            out.end = i + 1;
            continue;
        }
        buf.truncate(before);
        if count > 0 {
            break;
        }
        // Alone and too large: degraded, then dropped.
        out.end = i + 1;
        if !row.key.is_degraded() {
            row.key.degrade();
            write_row(&mut buf, row, timestamp);
            if buf.len() + TAIL.len() <= cap {
                count += 1;
                out.degraded.push(i);
                continue;
            }
            buf.truncate(before);
        }
        out.dropped.push(i);
    }
    if count > 0 {
        buf.extend_from_slice(TAIL);
        out.bytes = Some(buf);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::aggregate::{Counts, Evaluation, RowKey, Tier};
    use crate::flags::context::Captured;

    fn row(flag: &str, tk: &str, full_data: bool) -> Row {
        let (key, at) = RowKey::of(Evaluation {
            flag: flag.into(),
            variant: Some("on".into()),
            allocation: Some("a1".into()),
            targeting_key: Some(tk.into()),
            context: vec![
                ("plan".into(), Captured::Str("pro".into())),
                ("n".into(), Captured::Int(1)),
            ],
            timestamp_ms: 1_760_000_000_000,
            full_data,
            ..Default::default()
        });
        Row {
            key,
            counts: Counts::one(at),
            tier: Tier::Full,
        }
    }

    fn parse(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn encodes_the_intake_shape_and_omits_absent_fields() {
        let ctx = Context {
            service: "svc".into(),
            env: String::new(),
            version: "1".into(),
        };
        let mut no_variant = row("g", "u", false);
        no_variant.key.variant = None;
        no_variant.key.allocation = None;
        no_variant.key.targeting_key = None;
        no_variant.key.error = Some("FLAG_NOT_FOUND".into());
        let mut rows = vec![row("f", "u", true), no_variant];
        let body = next_body(
            &head(&ctx),
            &mut rows,
            0,
            1_760_000_001_000,
            1 << 20,
            Vec::new(),
        );
        assert_eq!(body.end, 2);
        let v = parse(body.bytes.as_deref().unwrap());
        assert_eq!(
            v,
            serde_json::json!({
                "context": {"service": "svc", "version": "1"},
                "flagEvaluations": [{
                    "timestamp": 1_760_000_001_000i64,
                    "flag": {"key": "f"},
                    "first_evaluation": 1_760_000_000_000i64,
                    "last_evaluation": 1_760_000_000_000i64,
                    "evaluation_count": 1,
                    "variant": {"key": "on"},
                    "allocation": {"key": "a1"},
                    "targeting_key": "u",
                    "context": {"evaluation": {"n": 1, "plan": "pro"}}
                }, {
                    "timestamp": 1_760_000_001_000i64,
                    "flag": {"key": "g"},
                    "first_evaluation": 1_760_000_000_000i64,
                    "last_evaluation": 1_760_000_000_000i64,
                    "evaluation_count": 1,
                    "runtime_default_used": true,
                    "error": {"message": "FLAG_NOT_FOUND"}
                }]
            })
        );
    }

    #[test]
    fn splits_under_the_cap_degrades_then_drops_what_cannot_fit() {
        let h = head(&Context::default());
        let mut rows: Vec<Row> = (0..500).map(|i| row("f", &i.to_string(), true)).collect();
        // Too large with its targeting key, fits degraded.
        rows[100].key.targeting_key = Some("k".repeat(3_000));
        // Too large even degraded.
        rows[200].key.flag = "x".repeat(3_000);
        let cap = 2_000;
        let mut start = 0;
        let mut seen = Vec::new();
        let mut degraded: Vec<usize> = Vec::new();
        let mut dropped: Vec<usize> = Vec::new();
        let mut bodies = 0;
        while start < rows.len() {
            let b = next_body(&h, &mut rows, start, 1_760_000_001_000, cap, Vec::new());
            assert!(b.end > start);
            degraded.extend(&b.degraded);
            dropped.extend(&b.dropped);
            if let Some(bytes) = &b.bytes {
                bodies += 1;
                assert!(bytes.len() <= cap, "{} > {cap}", bytes.len());
                let v = parse(bytes);
                for r in v["flagEvaluations"].as_array().unwrap() {
                    seen.push(
                        r.get("targeting_key")
                            .and_then(|t| t.as_str())
                            .map(str::to_owned),
                    );
                }
                assert_eq!(
                    v["flagEvaluations"].as_array().unwrap().len(),
                    (start..b.end).filter(|i| b.holds(*i)).count()
                );
            }
            start = b.end;
        }
        assert!(bodies > 1);
        assert_eq!(degraded, [100]);
        assert_eq!(dropped, [200]);
        assert_eq!(seen.len(), 499);
        assert_eq!(seen[100], None);
        assert!(rows[100].key.is_degraded());
    }

    #[test]
    fn five_mib_cap_holds_for_a_full_window() {
        let h = head(&Context::default());
        let mut rows: Vec<Row> = (0..40_000)
            .map(|i| row("flag", &format!("user-{i}-{}", "p".repeat(100)), true))
            .collect();
        let cap = 5 * 1024 * 1024;
        let mut start = 0;
        let mut total = 0;
        let mut bodies = 0;
        while start < rows.len() {
            let b = next_body(&h, &mut rows, start, 1_760_000_001_000, cap, Vec::new());
            let bytes = b.bytes.unwrap();
            assert!(bytes.len() <= cap);
            total += parse(&bytes)["flagEvaluations"].as_array().unwrap().len();
            bodies += 1;
            start = b.end;
        }
        assert_eq!(total, 40_000);
        assert!(bodies >= 2);
    }
}
