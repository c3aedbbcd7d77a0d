//! Sending traces to the agent: split, POST, retry, report.
//!
//! [`TraceExporter::send`] is the whole synchronous path after conversion:
//! it normalises and encodes the traces, splits them under the payload cap,
//! POSTs each body with retries under one total deadline, and folds every
//! outcome into a [`SendReport`]. It never fails: what went wrong is in the
//! report.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

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
    /// Of `failed_traces`, those whose last attempt timed out after the
    /// request was sent: the agent may have received them.
    pub timed_out_traces: usize,
    /// Where the failed traces that can succeed later start: every trace
    /// from this index of the batch on was not delivered because of a
    /// retryable failure (agent down, timeout, 408/429/5xx) and is counted
    /// in `failed_traces`. A caller that keeps data (a batch worker) puts
    /// them back instead; the rest of `failed_traces` failed for good.
    pub retry_from: Option<usize>,
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

    /// Counts `n` traces dropped because each alone exceeds `cap` bytes.
    pub fn note_oversized(&mut self, n: usize, cap: usize) {
        if n > 0 {
            self.oversized_traces += n;
            self.note_error(format!(
                "trace(s) dropped: each alone exceeds the {cap} byte payload limit"
            ));
        }
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

    /// How long one attempt may take now (the configured timeout,
    /// stretched while the agent is slow).
    pub fn attempt_timeout(&self) -> Duration {
        self.client.attempt_timeout(self.config.timeout)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Sends `traces`; must run on the shared runtime of `generation`.
    /// The traces are borrowed so a caller whose send is cancelled still
    /// holds them.
    ///
    /// After a retryable failure nothing more is sent: that body and every
    /// trace after it are reported from `retry_from` on (a batch worker
    /// keeps them, in order). `stop_retrying`, once cancelled, ends the
    /// send after the attempt in flight (see [`Post::stop_retrying`]).
    pub async fn send(
        &self,
        traces: &[Trace],
        generation: u64,
        stop_retrying: Option<&CancellationToken>,
    ) -> SendReport {
        if self.is_closed() {
            return SendReport::failed(traces.len(), "transport is closed".into());
        }
        let c = &self.config;
        let deadline = Instant::now() + c.deadline.max(self.client.attempt_timeout(c.timeout));
        let mut report = SendReport::default();
        // One body at a time, encoded just before it is sent, into the
        // buffer of the body sent before it.
        let mut offset = 0;
        let mut buf = self.take_spare();
        while offset < traces.len() {
            let next = next_payload(
                &traces[offset..],
                &c.defaults,
                c.protocol,
                c.max_payload,
                buf,
            );
            buf = Vec::new();
            let mut outcome = Ok(());
            if let Some(p) = next.payload {
                let count = p.trace_count;
                let body = Bytes::from(p.body);
                outcome = self
                    .post_with_retries(
                        body.clone(),
                        count,
                        deadline,
                        generation,
                        stop_retrying,
                        &mut report,
                    )
                    .await;
                buf = reclaim(body);
                match outcome {
                    Ok(()) => report.trace_count += count,
                    Err(u) if u.retryable => {}
                    Err(u) => {
                        report.failed_traces += count;
                        if u.maybe_arrived {
                            report.timed_out_traces += count;
                        }
                    }
                }
            }
            if let Err(u) = outcome.filter_retryable() {
                // This body's traces (oversized ones included: they are
                // counted when met again) and all after it, for later.
                report.retry_from = Some(offset);
                report.failed_traces += traces.len() - offset;
                if u.maybe_arrived {
                    report.timed_out_traces += next.consumed - next.oversized_traces;
                }
                break;
            }
            report.note_oversized(next.oversized_traces, c.max_payload);
            offset += next.consumed;
        }
        self.keep_spare(buf);
        report
    }

    /// Sends one body already encoded (by a sidecar client) with retries,
    /// under the same deadline rule as [`TraceExporter::send`]. Requests,
    /// status and the problem met are noted in `report`; trace counts are
    /// the caller's to keep.
    pub async fn send_encoded(
        &self,
        body: Bytes,
        trace_count: usize,
        generation: u64,
        stop_retrying: Option<&CancellationToken>,
        report: &mut SendReport,
    ) -> Result<(), Undelivered> {
        if self.is_closed() {
            report.note_error("transport is closed");
            return Err(Undelivered {
                retryable: false,
                maybe_arrived: false,
            });
        }
        let c = &self.config;
        let deadline = Instant::now() + c.deadline.max(self.client.attempt_timeout(c.timeout));
        self.post_with_retries(
            body,
            trace_count,
            deadline,
            generation,
            stop_retrying,
            report,
        )
        .await
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

    /// One body, retried as the policy allows.
    async fn post_with_retries(
        &self,
        body: Bytes,
        trace_count: usize,
        deadline: Instant,
        generation: u64,
        stop_retrying: Option<&CancellationToken>,
        report: &mut SendReport,
    ) -> Result<(), Undelivered> {
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
            stop_retrying,
        };
        let resp = request.send(body, deadline, report).await?;
        report.rate_by_service = parse_rates(&resp.body);
        Ok(())
    }
}

/// A sent body's buffer, when the request no longer holds it (else an
/// empty one: the body is freed when the request drops it).
fn reclaim(body: Bytes) -> Vec<u8> {
    body.try_into_mut().map(Vec::from).unwrap_or_default()
}

/// Why a body was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Undelivered {
    /// Trying again later could succeed (agent down or slow, 408/429/5xx).
    pub retryable: bool,
    /// The last attempt timed out after the request was sent: the agent
    /// may have processed it, so sending it again may duplicate it.
    pub maybe_arrived: bool,
}

trait FilterRetryable {
    fn filter_retryable(self) -> Result<(), Undelivered>;
}

impl FilterRetryable for Result<(), Undelivered> {
    /// Keeps only a retryable failure.
    fn filter_retryable(self) -> Result<(), Undelivered> {
        match self {
            Err(u) if u.retryable => Err(u),
            _ => Ok(()),
        }
    }
}

/// One POST to the agent, with its retry settings.
pub struct Post<'a> {
    pub client: &'a Client,
    pub generation: u64,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    /// Per attempt, as configured (the client stretches it for a slow
    /// agent: see [`Client::attempt_timeout`]).
    pub timeout: Duration,
    pub retry: &'a RetryPolicy,
    /// Once cancelled, no new attempt starts and a backoff wait ends: the
    /// body is reported undelivered and retryable. The attempt in flight is
    /// never cut short (cutting it could make the agent receive the body
    /// while we count it unsent, then send it again). A batch worker
    /// cancels it before fork.
    pub stop_retrying: Option<&'a CancellationToken>,
}

impl Post<'_> {
    /// Sends `body`, retrying what can succeed later, until `deadline`.
    /// Returns the 2xx response, or why not with the problem noted in
    /// `report` (which also counts requests and keeps the last status).
    pub async fn send(
        &self,
        body: Bytes,
        deadline: Instant,
        report: &mut SendReport,
    ) -> Result<HttpResponse, Undelivered> {
        let mut retry = 0;
        // Out of time, the problem reported is the last attempt's (the same
        // outage must always read the same, so it is logged once).
        let mut last_problem: Option<String> = None;
        let mut last = Undelivered {
            retryable: true,
            maybe_arrived: false,
        };
        let stopping = || self.stop_retrying.is_some_and(|t| t.is_cancelled());
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || (retry > 0 && stopping()) {
                report.note_error(last_problem.unwrap_or_else(|| "deadline exceeded".into()));
                return Err(last);
            }
            let timeout = self.client.attempt_timeout(self.timeout).min(remaining);
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
                        return result.map_err(|_| last);
                    }
                    (Attempt::Status(resp.status), resp.retry_after)
                }
                Err(RequestError::Connect(_)) => (Attempt::ConnectError, None),
                Err(RequestError::Runtime(_) | RequestError::Build(_)) => {
                    (Attempt::Status(0), None)
                }
                Err(RequestError::Timeout { .. } | RequestError::Http(_)) => {
                    (Attempt::Timeout, None)
                }
            };
            last = Undelivered {
                retryable: attempt.is_retryable(),
                maybe_arrived: matches!(result, Err(RequestError::Timeout { sent: true })),
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
                    match self.stop_retrying {
                        Some(t) => {
                            tokio::select! {
                                _ = tokio::time::sleep(d) => {}
                                _ = t.cancelled() => {}
                            }
                        }
                        None => tokio::time::sleep(d).await,
                    }
                    retry += 1;
                }
                None => {
                    report.note_error(problem);
                    return Err(last);
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
