//! Splitting traces into request bodies under the agent's payload cap.
//!
//! Traces are never cut: a body holds whole traces, in order. A trace that
//! alone would exceed the cap cannot be sent at all; it is dropped and
//! counted so the caller can report it.

use crate::encode::{v04, v05, Protocol};
use crate::span::{SpanDefaults, Trace};

/// The agent's default limit on one request body.
pub const DEFAULT_MAX_PAYLOAD: usize = 5 * 1024 * 1024;

/// One request body and how many traces it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    pub body: Vec<u8>,
    pub trace_count: usize,
}

/// The next body to send, taken from the front of a list of traces.
#[derive(Debug, Default, PartialEq)]
pub struct Next {
    /// None when every trace used was oversized.
    pub payload: Option<Payload>,
    /// How many traces from the front were used: sent in the body or
    /// dropped as oversized.
    pub consumed: usize,
    /// Traces dropped because alone they exceed the cap.
    pub oversized_traces: usize,
}

/// Encodes as many whole traces from the front of `traces` as fit in one
/// body of at most `cap` bytes, skipping (and counting) any that alone
/// would not fit. A v0.4 body is written into `buf`, cleared first: a
/// caller sending bodies one after the other reuses one buffer, whose
/// pages are already mapped.
pub fn next_payload(
    traces: &[Trace],
    defaults: &SpanDefaults,
    protocol: Protocol,
    cap: usize,
    buf: Vec<u8>,
) -> Next {
    match protocol {
        Protocol::V04 => {
            let mut body = v04::PayloadBuilder::with_buffer(buf);
            let (consumed, oversized_traces) = fill(traces, |t| {
                (body.try_add(t, defaults, cap), body.trace_count())
            });
            Next {
                payload: (body.trace_count() > 0).then(|| body.finish()),
                consumed,
                oversized_traces,
            }
        }
        Protocol::V05 => {
            let mut body = v05::Builder::new();
            let (consumed, oversized_traces) = fill(traces, |t| {
                (body.try_add(t, defaults, Some(cap)), body.trace_count())
            });
            Next {
                payload: (body.trace_count() > 0).then(|| Payload {
                    trace_count: body.trace_count(),
                    body: body.finish(),
                }),
                consumed,
                oversized_traces,
            }
        }
    }
}

/// Adds traces while they fit (`try_add` tells whether it did, and how
/// many the body holds); a trace that does not fit an empty body is
/// oversized and skipped. Returns (traces used, oversized).
fn fill(traces: &[Trace], mut try_add: impl FnMut(&Trace) -> (bool, usize)) -> (usize, usize) {
    let mut oversized = 0;
    for (i, trace) in traces.iter().enumerate() {
        match try_add(trace) {
            (true, _) => continue,
            (false, 0) => oversized += 1,
            (false, _) => return (i, oversized),
        }
    }
    (traces.len(), oversized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::SpanData;

    /// The bodies to send plus what could not be sent.
    #[derive(Debug, Default, PartialEq)]
    struct Split {
        payloads: Vec<Payload>,
        /// Traces dropped because alone they exceed the cap.
        oversized_traces: usize,
    }

    /// Every body for `traces`, as a sender calling [`next_payload`] until
    /// all are used gets them: as few bodies as fit under `cap` bytes each.
    fn split(traces: &[Trace], defaults: &SpanDefaults, protocol: Protocol, cap: usize) -> Split {
        let mut out = Split::default();
        let mut rest = traces;
        while !rest.is_empty() {
            let next = next_payload(rest, defaults, protocol, cap, Vec::new());
            out.payloads.extend(next.payload);
            out.oversized_traces += next.oversized_traces;
            rest = &rest[next.consumed..];
        }
        out
    }

    const D: SpanDefaults = SpanDefaults {
        service: String::new(),
        env: String::new(),
        version: String::new(),
    };

    fn trace(id: u64, resource_len: usize) -> Trace {
        Trace::from(vec![SpanData {
            trace_id: id.into(),
            span_id: id,
            name: "n".into(),
            resource: "r".repeat(resource_len),
            ..Default::default()
        }])
    }

    fn decoded_trace_ids(p: &Payload, protocol: Protocol) -> Vec<u64> {
        let v = rmpv::decode::read_value(&mut p.body.as_slice()).unwrap();
        let traces = match protocol {
            Protocol::V04 => v.as_array().unwrap().clone(),
            Protocol::V05 => v.as_array().unwrap()[1].as_array().unwrap().clone(),
        };
        traces
            .iter()
            .map(|t| {
                let s = &t.as_array().unwrap()[0];
                match protocol {
                    Protocol::V04 => s.as_map().unwrap()[0].1.as_u64().unwrap(),
                    Protocol::V05 => s.as_array().unwrap()[3].as_u64().unwrap(),
                }
            })
            .collect()
    }

    #[test]
    fn everything_fits_in_one_body() {
        for protocol in [Protocol::V04, Protocol::V05] {
            let traces: Vec<Trace> = (1..=10).map(|i| trace(i, 10)).collect();
            let s = split(&traces, &D, protocol, DEFAULT_MAX_PAYLOAD);
            assert_eq!(s.payloads.len(), 1);
            assert_eq!(s.payloads[0].trace_count, 10);
            assert_eq!(s.oversized_traces, 0);
        }
    }

    #[test]
    fn splits_between_traces_under_the_cap_in_order() {
        for protocol in [Protocol::V04, Protocol::V05] {
            let traces: Vec<Trace> = (1..=50).map(|i| trace(i, 300 + i as usize)).collect();
            let cap = 2_000;
            let s = split(&traces, &D, protocol, cap);
            assert!(s.payloads.len() > 5, "{protocol:?}: {}", s.payloads.len());
            let mut ids = Vec::new();
            for p in &s.payloads {
                assert!(p.body.len() <= cap, "{protocol:?}: {}", p.body.len());
                let got = decoded_trace_ids(p, protocol);
                assert_eq!(got.len(), p.trace_count);
                ids.extend(got);
            }
            assert_eq!(ids, (1..=50).collect::<Vec<u64>>());
            assert_eq!(s.oversized_traces, 0);
        }
    }

    #[test]
    fn oversized_trace_is_dropped_and_counted_others_sent() {
        for protocol in [Protocol::V04, Protocol::V05] {
            let traces = vec![trace(1, 10), trace(2, 5_000), trace(3, 10)];
            let s = split(&traces, &D, protocol, 1_000);
            assert_eq!(s.oversized_traces, 1, "{protocol:?}");
            let ids: Vec<u64> = s
                .payloads
                .iter()
                .flat_map(|p| decoded_trace_ids(p, protocol))
                .collect();
            assert_eq!(ids, vec![1, 3]);
        }
    }

    #[test]
    fn bodies_one_at_a_time_reuse_one_buffer_and_match_split() {
        let traces: Vec<Trace> = (1..=50).map(|i| trace(i, 300 + i as usize)).collect();
        let cap = 2_000;
        let mut buf = Vec::with_capacity(64 * 1024);
        let allocation = buf.as_ptr();
        let mut rest = &traces[..];
        let mut bodies = Vec::new();
        while !rest.is_empty() {
            let next = next_payload(rest, &D, Protocol::V04, cap, buf);
            rest = &rest[next.consumed..];
            let p = next.payload.expect("a body");
            assert_eq!(p.body.as_ptr(), allocation, "written into the given buffer");
            bodies.push(p.body.clone());
            buf = p.body;
        }
        let whole = split(&traces, &D, Protocol::V04, cap);
        let expected: Vec<Vec<u8>> = whole.payloads.into_iter().map(|p| p.body).collect();
        assert_eq!(bodies, expected);
    }

    #[test]
    fn empty_input_gives_no_body() {
        assert_eq!(split(&[], &D, Protocol::V04, 100), Split::default());
        assert_eq!(split(&[], &D, Protocol::V05, 100), Split::default());
    }
}
