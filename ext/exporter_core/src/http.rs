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
    pub fn parse(url: &str) -> Result<Endpoint, UrlError> {
        let bad = |why: &str| UrlError(format!("invalid agent url {url:?}: {why}"));
        if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("a unix socket path must be absolute (unix:///path)"));
            }
            return Ok(Endpoint::Unix { path: path.into() });
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("scheme must be http:// or unix://"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            return Err(bad("missing host"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            (h.to_owned(), after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (authority.to_owned(), None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("invalid port"))?,
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

/// Why one request failed before any status came back.
#[derive(Debug)]
pub enum RequestError {
    Connect(std::io::Error),
    /// The request did not complete within its timeout.
    Timeout,
    /// The connection broke or the server spoke bad HTTP.
    Http(hyper::Error),
    /// The runtime could not be used.
    Runtime(crate::runtime::RuntimeError),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Connect(e) => write!(f, "connect failed: {e}"),
            RequestError::Timeout => f.write_str("timed out"),
            RequestError::Http(e) => write!(f, "http error: {e}"),
            RequestError::Runtime(e) => e.fmt(f),
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

/// A keep-alive client for one endpoint.
pub struct Client {
    endpoint: Endpoint,
    host_header: String,
    pool: Mutex<Pool>,
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
        }
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
        tokio::time::timeout(timeout, self.post_inner(generation, path, headers, body))
            .await
            .unwrap_or(Err(RequestError::Timeout))
    }

    fn request(&self, path: &str, headers: &[(&str, &str)], body: Bytes) -> Request<Full<Bytes>> {
        let mut builder = Request::post(path)
            .header("Host", &self.host_header)
            .header("Content-Length", body.len());
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        // Header names are constants and values are checked by the caller
        // (`crate::agent`), so building cannot fail.
        builder
            .body(Full::new(body))
            .expect("request parts are valid")
    }

    async fn post_inner(
        &self,
        generation: u64,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<HttpResponse, RequestError> {
        let req = self.request(path, headers, body.clone());
        let (mut conn, reused) = match self.checkout(generation) {
            Some(c) => (c, true),
            None => (self.connect().await?, false),
        };
        let resp = match conn.send_request(req).await {
            Ok(r) => r,
            // A pooled connection the server closed meanwhile: the request
            // was not processed (hyper reports it before sending), retry once
            // on a fresh connection.
            Err(e) if reused && (e.is_canceled() || e.is_closed() || e.is_incomplete_message()) => {
                let req = self.request(path, headers, body);
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
            "h:1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
