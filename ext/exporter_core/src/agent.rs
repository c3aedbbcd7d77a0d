//! Sending traces to the agent: split, POST, retry, report.
//!
//! [`TraceExporter::send`] is the whole synchronous path after conversion:
//! it normalises and encodes the traces, splits them under the payload cap,
//! POSTs each body with retries under one total deadline, and folds every
//! outcome into a [`SendReport`]. It never fails: what went wrong is in the
//! report.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::encode::Protocol;
use crate::http::{Client, Endpoint, HttpResponse, RequestError, UrlError};
use crate::retry::{Attempt, RetryPolicy};
use crate::span::{SpanDefaults, Trace};
use crate::split::{next_payload, DEFAULT_MAX_PAYLOAD};

/// Everything a trace exporter is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    pub url: String,
    pub protocol: Protocol,
    /// Per attempt.
    pub timeout: Duration,
    /// Total per `send`, across bodies, attempts and waits.
    pub deadline: Duration,
    pub retry: RetryPolicy,
    pub max_payload: usize,
    pub defaults: SpanDefaults,
    pub lang_version: String,
    pub lang_interpreter: String,
    pub tracer_version: String,
    pub container_id: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            url: "http://127.0.0.1:8126".into(),
            protocol: Protocol::V04,
            timeout: Duration::from_secs(3),
            deadline: Duration::from_secs(9),
            retry: RetryPolicy::default(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            defaults: SpanDefaults::default(),
            lang_version: String::new(),
            lang_interpreter: String::new(),
            tracer_version: String::new(),
            container_id: None,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    Url(UrlError),
    /// A header value with characters HTTP does not allow.
    Header(&'static str),
    /// A zero or negative duration or size.
    Range(&'static str),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Url(e) => e.fmt(f),
            ConfigError::Header(name) => write!(
                f,
                "{name} contains characters not allowed in an HTTP header"
            ),
            ConfigError::Range(what) => write!(f, "{what} must be positive"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// What one `send` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendReport {
    /// Status of the last response received, if any.
    pub status: Option<u16>,
    /// Traces the agent accepted (2xx).
    pub trace_count: usize,
    /// Traces that could not be delivered (after retries), excluding oversized.
    pub failed_traces: usize,
    /// Traces dropped because alone they exceed the payload cap.
    pub oversized_traces: usize,
    /// Requests made, retries included.
    pub requests: usize,
    /// `rate_by_service` of the last successful response.
    pub rate_by_service: Vec<(String, f64)>,
    /// The first problem met, if any.
    pub error: Option<String>,
}

impl SendReport {
    /// A report of `count` traces not sent because of `error`.
    pub fn failed(count: usize, error: String) -> SendReport {
        SendReport {
            failed_traces: count,
            error: Some(error),
            ..Default::default()
        }
    }

    /// Whether every trace was accepted.
    pub fn is_ok(&self) -> bool {
        self.error.is_none() && self.failed_traces == 0 && self.oversized_traces == 0
    }

    pub fn note_error(&mut self, e: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(e.into());
        }
    }
}

/// Sends traces to one agent.
pub struct TraceExporter {
    config: Config,
    client: Client,
    fixed_headers: Vec<(&'static str, String)>,
    closed: std::sync::atomic::AtomicBool,
    /// The buffer of the last body sent, kept for the next send: a body is
    /// up to `max_payload` bytes, and a fresh buffer of that size costs a
    /// page fault per page (a quarter of the flusher's time when each batch
    /// allocated its bodies). One buffer, of at most twice `max_payload`
    /// (a body grows by doubling).
    spare: std::sync::Mutex<Vec<u8>>,
}

fn check_header(name: &'static str, value: &str) -> Result<(), ConfigError> {
    hyper::header::HeaderValue::from_str(value)
        .map(|_| ())
        .map_err(|_| ConfigError::Header(name))
}

impl TraceExporter {
    pub fn new(config: Config) -> Result<TraceExporter, ConfigError> {
        let endpoint = Endpoint::parse(&config.url).map_err(ConfigError::Url)?;
        if config.timeout.is_zero() {
            return Err(ConfigError::Range("timeout"));
        }
        if config.deadline.is_zero() {
            return Err(ConfigError::Range("deadline"));
        }
        if config.max_payload == 0 {
            return Err(ConfigError::Range("max_payload_size"));
        }
        let mut fixed_headers = vec![
            ("Content-Type", "application/msgpack".to_owned()),
            ("Datadog-Meta-Lang", "ruby".to_owned()),
            ("Datadog-Meta-Lang-Version", config.lang_version.clone()),
            (
                "Datadog-Meta-Lang-Interpreter",
                config.lang_interpreter.clone(),
            ),
            ("Datadog-Meta-Tracer-Version", config.tracer_version.clone()),
            ("Datadog-Send-Real-Http-Status", "1".to_owned()),
        ];
        if let Some(id) = &config.container_id {
            fixed_headers.push(("Datadog-Container-ID", id.clone()));
        }
        for (name, value) in &fixed_headers {
            check_header(name, value)?;
        }
        Ok(TraceExporter {
            client: Client::new(endpoint),
            config,
            fixed_headers,
            closed: std::sync::atomic::AtomicBool::new(false),
            spare: std::sync::Mutex::new(Vec::new()),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Stops sending: later sends report every trace as failed with
    /// "transport is closed". Pooled connections are dropped. Idempotent.
    pub fn close(&self) {
        if !self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.client.clear();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Sends `traces`; must run on the shared runtime of `generation`.
    /// The traces are borrowed so a caller whose send is cancelled still
    /// holds them.
    pub async fn send(&self, traces: &[Trace], generation: u64) -> SendReport {
        if self.is_closed() {
            return SendReport::failed(traces.len(), "transport is closed".into());
        }
        let deadline = Instant::now() + self.config.deadline;
        let c = &self.config;
        let mut report = SendReport::default();
        // One body at a time, encoded just before it is sent, into the
        // buffer of the body sent before it.
        let mut rest = traces;
        let mut buf = self.take_spare();
        while !rest.is_empty() {
            let next = next_payload(rest, &c.defaults, c.protocol, c.max_payload, buf);
            rest = &rest[next.consumed..];
            buf = Vec::new();
            if next.oversized_traces > 0 {
                report.oversized_traces += next.oversized_traces;
                report.note_error(format!(
                    "trace(s) dropped: each alone exceeds the {} byte payload limit",
                    c.max_payload
                ));
            }
            let Some(p) = next.payload else { continue };
            let count = p.trace_count;
            let body = Bytes::from(p.body);
            let accepted = self
                .post_with_retries(body.clone(), count, deadline, generation, &mut report)
                .await;
            buf = reclaim(body);
            if accepted {
                report.trace_count += count;
            } else {
                report.failed_traces += count;
                if Instant::now() >= deadline {
                    break;
                }
            }
        }
        self.keep_spare(buf);
        if !rest.is_empty() {
            report.failed_traces += rest.len();
            report.note_error("deadline exceeded before every payload was sent");
        }
        report
    }

    fn take_spare(&self) -> Vec<u8> {
        self.spare
            .lock()
            .map(|mut spare| std::mem::take(&mut *spare))
            .unwrap_or_default()
    }

    /// Keeps a body buffer for the next send (the larger of two is kept).
    fn keep_spare(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > self.config.max_payload.saturating_mul(2) {
            return;
        }
        if let Ok(mut spare) = self.spare.lock() {
            if buf.capacity() > spare.capacity() {
                *spare = buf;
            }
        }
    }

    /// One body, retried as the policy allows. True when accepted.
    async fn post_with_retries(
        &self,
        body: Bytes,
        trace_count: usize,
        deadline: Instant,
        generation: u64,
        report: &mut SendReport,
    ) -> bool {
        let count = trace_count.to_string();
        let headers: Vec<(&str, &str)> = self
            .fixed_headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain([("X-Datadog-Trace-Count", count.as_str())])
            .collect();
        let request = Post {
            client: &self.client,
            generation,
            path: self.config.protocol.path(),
            headers: &headers,
            timeout: self.config.timeout,
            retry: &self.config.retry,
        };
        match request.send(body, deadline, report).await {
            Some(resp) => {
                report.rate_by_service = parse_rates(&resp.body);
                true
            }
            None => false,
        }
    }
}

/// A sent body's buffer, when the request no longer holds it (else an
/// empty one: the body is freed when the request drops it).
fn reclaim(body: Bytes) -> Vec<u8> {
    body.try_into_mut().map(Vec::from).unwrap_or_default()
}

/// One POST to the agent, with its retry settings.
pub struct Post<'a> {
    pub client: &'a Client,
    pub generation: u64,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    /// Per attempt.
    pub timeout: Duration,
    pub retry: &'a RetryPolicy,
}

impl Post<'_> {
    /// Sends `body`, retrying what can succeed later, until `deadline`.
    /// Returns the 2xx response, or `None` with the problem noted in
    /// `report` (which also counts requests and keeps the last status).
    pub async fn send(
        &self,
        body: Bytes,
        deadline: Instant,
        report: &mut SendReport,
    ) -> Option<HttpResponse> {
        let mut retry = 0;
        // Out of time, the problem reported is the last attempt's (the same
        // outage must always read the same, so it is logged once).
        let mut last_problem: Option<String> = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                report.note_error(last_problem.unwrap_or_else(|| "deadline exceeded".into()));
                return None;
            }
            let timeout = self.timeout.min(remaining);
            report.requests += 1;
            let result = self
                .client
                .post(
                    self.generation,
                    self.path,
                    self.headers,
                    body.clone(),
                    timeout,
                )
                .await;
            let (attempt, retry_after) = match &result {
                Ok(resp) => {
                    report.status = Some(resp.status);
                    if (200..300).contains(&resp.status) {
                        return result.ok();
                    }
                    (Attempt::Status(resp.status), resp.retry_after)
                }
                Err(RequestError::Connect(_)) => (Attempt::ConnectError, None),
                Err(RequestError::Runtime(_)) => (Attempt::Status(0), None),
                Err(_) => (Attempt::Timeout, None),
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let wait = self.retry.delay(
                retry,
                attempt,
                retry_after,
                remaining,
                crate::retry::jitter(),
            );
            let url = self.client.endpoint();
            let problem = match result {
                Ok(r) => format!(
                    "agent at {url} answered {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).trim()
                ),
                Err(e) => format!("agent at {url}: {e}"),
            };
            match wait {
                Some(d) => {
                    last_problem = Some(problem);
                    tokio::time::sleep(d).await;
                    retry += 1;
                }
                None => {
                    report.note_error(problem);
                    return None;
                }
            }
        }
    }
}

/// Reads `rate_by_service` from an agent response body; anything
/// unexpected yields no rates rather than an error.
pub fn parse_rates(body: &[u8]) -> Vec<(String, f64)> {
    #[derive(serde::Deserialize)]
    struct Rates {
        #[serde(default)]
        rate_by_service: std::collections::BTreeMap<String, f64>,
    }
    serde_json::from_slice::<Rates>(body)
        .map(|r| r.rate_by_service.into_iter().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_and_tolerates_junk() {
        let r = parse_rates(br#"{"rate_by_service":{"service:a,env:b":0.5,"service:,env:":1}}"#);
        assert_eq!(
            r,
            vec![
                ("service:,env:".into(), 1.0),
                ("service:a,env:b".into(), 0.5)
            ]
        );
        assert!(parse_rates(b"OK").is_empty());
        assert!(parse_rates(b"").is_empty());
    }

    #[test]
    fn rejects_bad_config() {
        let bad_url = Config {
            url: "tcp://x".into(),
            ..Default::default()
        };
        assert!(matches!(
            TraceExporter::new(bad_url),
            Err(ConfigError::Url(_))
        ));
        let bad_header = Config {
            tracer_version: "1\n2".into(),
            ..Default::default()
        };
        assert!(matches!(
            TraceExporter::new(bad_header),
            Err(ConfigError::Header("Datadog-Meta-Tracer-Version"))
        ));
        let zero = Config {
            timeout: Duration::ZERO,
            ..Default::default()
        };
        assert!(matches!(
            TraceExporter::new(zero),
            Err(ConfigError::Range("timeout"))
        ));
    }
}
