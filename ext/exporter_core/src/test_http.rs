//! Test support: a scripted HTTP server on the shared runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// A minimal HTTP server answering each request with the next status
/// of `statuses` (the last one repeats) and keeping request bodies.
pub async fn server(statuses: Vec<u16>) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let gate = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
    let (url, bodies) = gated(statuses, gate).await;
    (url, bodies)
}

/// As [`server`], each answer taking a permit of `gate` first (a test
/// holds answers back with a gate of 0 permits, then adds some).
pub async fn gated(statuses: Vec<u16>, gate: Arc<Semaphore>) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    tokio::spawn(async move {
        let n = Arc::new(AtomicU64::new(0));
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (bodies, n, statuses) = (kept.clone(), n.clone(), statuses.clone());
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 65536];
                    let Ok(r) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if r == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..r]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse().unwrap())
                            .unwrap_or(0);
                        if buf.len() < end + 4 + len {
                            break;
                        }
                        let body = buf[end + 4..end + 4 + len].to_vec();
                        buf.drain(..end + 4 + len);
                        bodies.lock().unwrap().push(body);
                        let Ok(permit) = gate.acquire().await else {
                            return;
                        };
                        permit.forget();
                        let i = n.fetch_add(1, Ordering::SeqCst) as usize;
                        let status = statuses[i.min(statuses.len() - 1)];
                        let resp = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, bodies)
}
