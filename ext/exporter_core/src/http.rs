//! A minimal HTTP/1.1 client for the agent: TCP or Unix socket, keep-alive.
//!
//! The pool keeps idle connections of the current runtime generation only
//! (see `crate::runtime`): a connection never outlives the runtime that
//! drives it, and never crosses a fork. Connections from an older generation
//! are leaked, not dropped, because dropping them would touch the old
//! runtime.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Unix { path: String },
}

/// A bad agent URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlError(pub String);

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UrlError {}

impl Endpoint {
    /// Parses `http://host[:port][/]` or `unix:///absolute/path`.
    ///
    /// Rejected, with the reason: other schemes, whitespace or control
    /// characters anywhere (a trailing newline from an environment variable
    /// is the usual culprit), a host that is not a hostname or an IP
    /// address, a port out of range, and credentials (`user:pass@`), which
    /// the agent never needs: they are not echoed in the error, which shows
    /// the URL with them masked.
    pub fn parse(url: &str) -> Result<Endpoint, UrlError> {
        let bad = |why: &str| UrlError(format!("invalid agent url {:?}: {why}", redact(url)));
        if let Some(c) = url.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(&format!(
                "contains whitespace or a control character ({:?})",
                c
            )));
        }
        if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("a unix socket path must be absolute (unix:///path)"));
            }
            return Ok(Endpoint::Unix { path: path.into() });
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("scheme must be http:// or unix://"))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(bad("credentials (user:password@) are not supported"));
        }
        if authority.is_empty() {
            return Err(bad("missing host"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("invalid IPv6 address"));
            }
            match after {
                "" => (h.to_owned(), None),
                _ => (
                    h.to_owned(),
                    Some(after.strip_prefix(':').ok_or_else(|| bad("invalid port"))?),
                ),
            }
        } else {
            let (h, p) = match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            if !valid_hostname(h) {
                return Err(bad("invalid host"));
            }
            (h.to_owned(), p)
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("invalid port"))?,
            None => 80,
        };
        Ok(Endpoint::Tcp { host, port })
    }

    /// The `Host` header value.
    fn host_header(&self) -> String {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
            Endpoint::Unix { .. } => "localhost".into(),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { .. } => write!(f, "http://{}", self.host_header()),
            Endpoint::Unix { path } => write!(f, "unix://{path}"),
        }
    }
}

/// A hostname (RFC 1123 labels; `_` tolerated, as resolvers do) or an
/// IPv4 address.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `url` with any credentials (`user:pass@`) masked, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Why one request failed before any status came back.
#[derive(Debug)]
pub enum RequestError {
    Connect(std::io::Error),
    /// The request did not complete within its timeout. `sent`: the
    /// connection was up and the request was being written or answered, so
    /// the server may have processed it.
    Timeout {
        sent: bool,
    },
    /// The connection broke or the server spoke bad HTTP.
    Http(hyper::Error),
    /// The runtime could not be used.
    Runtime(crate::runtime::RuntimeError),
    /// The request could not be built (a header the caller did not check).
    Build(hyper::http::Error),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Connect(e) => write!(f, "connect failed: {e}"),
            RequestError::Timeout { .. } => f.write_str("timed out"),
            RequestError::Http(e) => write!(f, "http error: {e}"),
            RequestError::Runtime(e) => e.fmt(f),
            RequestError::Build(e) => write!(f, "invalid request: {e}"),
        }
    }
}

impl std::error::Error for RequestError {}

/// An answer from the server.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// Largest response body read; the agent's answers are tiny.
const MAX_RESPONSE_BODY: usize = 1 << 20;
/// Idle connections kept per client.
const MAX_IDLE: usize = 4;

struct Pool {
    generation: u64,
    idle: Vec<SendRequest<Full<Bytes>>>,
}

/// Largest factor by which a slow agent stretches the attempt timeout.
const MAX_TIMEOUT_SCALE: u32 = 8;

/// A keep-alive client for one endpoint.
pub struct Client {
    endpoint: Endpoint,
    host_header: String,
    pool: Mutex<Pool>,
    /// How many times the configured attempt timeout an attempt gets now:
    /// doubled when a request times out after it was sent (the agent is
    /// slow, not gone), halved back on each success, so retries against a
    /// slow agent converge instead of timing out forever.
    timeout_scale: std::sync::atomic::AtomicU32,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Client {
        Client {
            host_header: endpoint.host_header(),
            endpoint,
            pool: Mutex::new(Pool {
                generation: 0,
                idle: Vec::new(),
            }),
            timeout_scale: std::sync::atomic::AtomicU32::new(1),
        }
    }

    /// The timeout of the next attempt, given the configured one.
    pub fn attempt_timeout(&self, configured: Duration) -> Duration {
        configured.saturating_mul(
            self.timeout_scale
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn note_speed(&self, result: &Result<HttpResponse, RequestError>) {
        use std::sync::atomic::Ordering::Relaxed;
        let scale = &self.timeout_scale;
        let _ = match result {
            Err(RequestError::Timeout { sent: true }) => {
                scale.fetch_update(Relaxed, Relaxed, |s| Some((s * 2).min(MAX_TIMEOUT_SCALE)))
            }
            Ok(_) => scale.fetch_update(Relaxed, Relaxed, |s| Some((s / 2).max(1))),
            Err(_) => Ok(0),
        };
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Drops every idle connection of the current generation.
    pub fn clear(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let idle = std::mem::take(&mut pool.idle);
        if pool.generation == crate::runtime::generation() {
            drop(idle);
        } else {
            std::mem::forget(idle);
        }
    }

    fn checkout(&self, generation: u64) -> Option<SendRequest<Full<Bytes>>> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.generation != generation {
            // Bound to a runtime that is gone (fork, or shut down): leak.
            std::mem::forget(std::mem::take(&mut pool.idle));
            pool.generation = generation;
        }
        while let Some(conn) = pool.idle.pop() {
            if conn.is_ready() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, generation: u64, conn: SendRequest<Full<Bytes>>) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.generation == generation && pool.idle.len() < MAX_IDLE && conn.is_ready() {
            pool.idle.push(conn);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, RequestError> {
        macro_rules! handshake {
            ($stream:expr) => {{
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new($stream))
                    .await
                    .map_err(RequestError::Http)?;
                tokio::spawn(async move {
                    // The connection's own error surfaces on the request.
                    let _ = conn.await;
                });
                send
            }};
        }
        match &self.endpoint {
            Endpoint::Tcp { host, port } => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(RequestError::Connect)?;
                let _ = stream.set_nodelay(true);
                Ok(handshake!(stream))
            }
            Endpoint::Unix { path } => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(RequestError::Connect)?;
                Ok(handshake!(stream))
            }
        }
    }

    /// POSTs `body` to `path` with `headers`, within `timeout`. Must run on
    /// the runtime of generation `generation`.
    pub async fn post(
        &self,
        generation: u64,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<HttpResponse, RequestError> {
        let sent = std::sync::atomic::AtomicBool::new(false);
        let result = tokio::time::timeout(
            timeout,
            self.post_inner(generation, path, headers, body, &sent),
        )
        .await
        .unwrap_or_else(|_| {
            Err(RequestError::Timeout {
                sent: sent.load(std::sync::atomic::Ordering::Relaxed),
            })
        });
        self.note_speed(&result);
        result
    }

    fn request(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, RequestError> {
        let mut builder = Request::post(path)
            .header("Host", &self.host_header)
            .header("Content-Length", body.len());
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        // Header names are constants and values are checked by the caller
        // (`crate::agent`); should one slip through, the request fails
        // (reported, never retried) rather than panicking the sender.
        builder.body(Full::new(body)).map_err(RequestError::Build)
    }

    async fn post_inner(
        &self,
        generation: u64,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        sent: &std::sync::atomic::AtomicBool,
    ) -> Result<HttpResponse, RequestError> {
        let req = self.request(path, headers, body.clone())?;
        let (mut conn, reused) = match self.checkout(generation) {
            Some(c) => (c, true),
            None => (self.connect().await?, false),
        };
        sent.store(true, std::sync::atomic::Ordering::Relaxed);
        let resp = match conn.send_request(req).await {
            Ok(r) => r,
            // A pooled connection the server closed meanwhile: the request
            // was not processed (hyper reports it before sending), retry once
            // on a fresh connection.
            Err(e) if reused && (e.is_canceled() || e.is_closed() || e.is_incomplete_message()) => {
                let req = self.request(path, headers, body)?;
                conn = self.connect().await?;
                conn.send_request(req).await.map_err(RequestError::Http)?
            }
            Err(e) => return Err(RequestError::Http(e)),
        };
        let status: StatusCode = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::retry::parse_retry_after);
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        self.checkin(generation, conn);
        Ok(HttpResponse {
            status: status.as_u16(),
            retry_after,
            body,
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agent_urls() {
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:8126").unwrap(),
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 8126
            }
        );
        assert_eq!(
            Endpoint::parse("http://agent/").unwrap(),
            Endpoint::Tcp {
                host: "agent".into(),
                port: 80
            }
        );
        assert_eq!(
            Endpoint::parse("http://[::1]:9000").unwrap(),
            Endpoint::Tcp {
                host: "::1".into(),
                port: 9000
            }
        );
        assert_eq!(
            Endpoint::parse("unix:///var/run/datadog/apm.socket").unwrap(),
            Endpoint::Unix {
                path: "/var/run/datadog/apm.socket".into()
            }
        );
        for bad in [
            "https://x",
            "ftp://x",
            "unix://relative",
            "http://",
            "http://h:99999",
            "http://h:0",
            "http://h:",
            "h:1",
            "http://127.0.0.1:8126\n",
            " http://127.0.0.1:8126",
            "http://127.0.0.1 :8126",
            "unix:///tmp/a b",
            "http://a\tb:1",
            "http://a..b:1",
            "http://-a:1",
            "http://[::1",
            "http://[zz]:1",
            "http://[::1]x",
            "http://h\u{7f}:1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Endpoint::parse("http://agent_1.local:1/x?y").unwrap(),
            Endpoint::Tcp {
                host: "agent_1.local".into(),
                port: 1
            }
        );
        assert_eq!(
            Endpoint::parse("http://[::1]").unwrap(),
            Endpoint::Tcp {
                host: "::1".into(),
                port: 80
            }
        );
    }

    #[test]
    fn credentials_are_rejected_and_never_echoed() {
        for url in [
            "http://user:secret@127.0.0.1:8126",
            "http://secret@agent",
            "http://user:secret@[::1]:1/",
        ] {
            let e = Endpoint::parse(url).unwrap_err().to_string();
            assert!(!e.contains("secret"), "{e}");
            assert!(e.contains("***@"), "{e}");
            assert!(e.contains("credentials"), "{e}");
        }
        assert_eq!(redact("http://u:p@h:1/a@b"), "http://***@h:1/a@b");
        assert_eq!(redact("http://h:1"), "http://h:1");
    }
}
