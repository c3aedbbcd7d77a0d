//! Benchmark tools (run by `bin/bench`):
//!
//! - `sink --port P`: a minimal agent stand-in. Answers every POST with 200
//!   and a tiny `rate_by_service` body after reading the request body;
//!   requests to `/hang` (every request, with `--hang`) are read and never
//!   answered (for interrupt latency). Prints `listening` when ready. Single-threaded, so it takes
//!   one core at most.
//! - `ceiling --url U --seconds S`: POSTs one pre-encoded 10-trace body over
//!   keep-alive as fast as possible: the sink's own ceiling in spans/s.
//! - `limit --url U --seconds S [--ids SHAPE]`: the ceiling of this design
//!   when conversion is free: pre-built `exporter_core` spans encoded by the
//!   project's own v0.4 encoder and POSTed by its own HTTP client, 10
//!   traces per request. Prints JSON.
//! - `encode [--ids SHAPE]`: the v0.4 encoder alone, CPU per span. Prints
//!   JSON.
//!
//! `SHAPE` is the workload's id shape, as in bench/workload.rb: `ddtrace`
//! or `random64` (the default).

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use exporter_core::encode::v04;
use exporter_core::http::{Client, Endpoint};
use exporter_core::span::{SpanData, SpanDefaults, Trace};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};

const SPANS_PER_TRACE: usize = 50;
const TRACES_PER_REQUEST: usize = 10;

/// SplitMix64: a seeded, deterministic id source.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn nonzero(&mut self, bits: u32) -> u64 {
        loop {
            let v = self.next() >> (64 - bits);
            if v != 0 {
                return v;
            }
        }
    }
}

/// The trace id and span ids of trace `n` in an id shape (see
/// bench/workload.rb): `ddtrace` a 128-bit trace id and 62-bit span ids,
/// `random64` 64-bit ids throughout.
fn workload_ids(n: u64, shape: &str) -> (u128, Vec<u64>) {
    let mut rng = Rng(0x5EED + n);
    if shape == "ddtrace" {
        let trace_id = (u128::from(1_700_000_000 + n) << 96) | u128::from(rng.nonzero(64));
        (
            trace_id,
            (0..SPANS_PER_TRACE).map(|_| rng.nonzero(62)).collect(),
        )
    } else {
        let trace_id = u128::from(rng.nonzero(64));
        (
            trace_id,
            (0..SPANS_PER_TRACE).map(|_| rng.nonzero(64)).collect(),
        )
    }
}

/// The benchmark workload, the same shape as bench/workload.rb: traces of
/// 50 spans with realistic meta and metrics, ids of the given shape.
fn workload_trace(n: u64, shape: &str) -> Trace {
    let (trace_id, span_ids) = workload_ids(n, shape);
    let spans: Vec<SpanData> = (0..SPANS_PER_TRACE as u64)
        .map(|i| SpanData {
            trace_id,
            span_id: span_ids[i as usize],
            parent_id: if i == 0 { 0 } else { span_ids[0] },
            name: if i == 0 {
                "rack.request"
            } else {
                "active_record.sql"
            }
            .into(),
            service: "shop-web".into(),
            resource: if i == 0 {
                "GET /products/:id".into()
            } else {
                format!(
                    "SELECT products.* FROM products WHERE id = ? /* q{} */",
                    i % 7
                )
            },
            r#type: if i == 0 { "web" } else { "sql" }.into(),
            start: 1_700_000_000_000_000_000 + (n as i64) * 1_000_000 + i as i64 * 1_000,
            duration: 250_000 + (i as i64) * 10,
            error: 0,
            meta: vec![
                ("component".into(), "rack".into()),
                ("http.method".into(), "GET".into()),
                ("http.url".into(), format!("/products/{}", n % 100)),
                ("env".into(), "bench".into()),
                ("version".into(), "1.4.2".into()),
                ("db.system".into(), "postgresql".into()),
            ],
            metrics: vec![
                ("_sampling_priority_v1".into(), 1.0),
                ("_dd.measured".into(), 1.0),
                ("db.row_count".into(), (i % 10) as f64),
            ],
            ..Default::default()
        })
        .collect();
    Trace::from(spans)
}

fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn sink(port: u16, hang_all: bool) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening {}", listener.local_addr()?.port());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let hang = hang_all || req.uri().path() == "/hang";
                    let _ = req.into_body().collect().await;
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        br#"{"rate_by_service":{"service:,env:":1.0}}"#,
                    ))))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn post_loop(url: &str, seconds: f64, mut body: impl FnMut() -> Bytes) -> serde_json::Value {
    let client = Client::new(Endpoint::parse(url).expect("valid url"));
    let (_, generation) = exporter_core::runtime::handle().expect("runtime");
    let count = TRACES_PER_REQUEST.to_string();
    let headers = [
        ("Content-Type", "application/msgpack"),
        ("X-Datadog-Trace-Count", count.as_str()),
    ];
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    let mut requests = 0u64;
    while t0.elapsed().as_secs_f64() < seconds {
        let r = client
            .post(
                generation,
                "/v0.4/traces",
                &headers,
                body(),
                Duration::from_secs(5),
            )
            .await
            .expect("sink answers");
        assert_eq!(r.status, 200);
        requests += 1;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (process_cpu() - cpu0).as_secs_f64();
    let spans = requests as f64 * (TRACES_PER_REQUEST * SPANS_PER_TRACE) as f64;
    serde_json::json!({
        "spans_per_s": spans / wall,
        "process_cpu_us_per_span": cpu * 1e6 / spans,
        "requests": requests,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cmd = args.get(1).map(String::as_str).unwrap_or("");
    let url = arg(&args, "--url").unwrap_or_else(|| "http://127.0.0.1:8126".into());
    let shape = arg(&args, "--ids").unwrap_or_else(|| "random64".into());
    let seconds: f64 = arg(&args, "--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    match cmd {
        "sink" => {
            let port: u16 = arg(&args, "--port")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let hang = args.iter().any(|a| a == "--hang");
            if let Err(e) = rt.block_on(sink(port, hang)) {
                eprintln!("sink: {e}");
                std::process::exit(1);
            }
        }
        "ceiling" => {
            let traces: Vec<Trace> = (0..TRACES_PER_REQUEST as u64)
                .map(|n| workload_trace(n, &shape))
                .collect();
            let body = Bytes::from(v04::encode(&traces, &SpanDefaults::default()));
            let (handle, _) = exporter_core::runtime::handle().expect("runtime");
            let out = handle.block_on(post_loop(&url, seconds, || body.clone()));
            println!("{out}");
        }
        "limit" => {
            let traces: Vec<Trace> = (0..1_000u64).map(|n| workload_trace(n, &shape)).collect();
            let mut next = 0usize;
            let (handle, _) = exporter_core::runtime::handle().expect("runtime");
            let out = handle.block_on(post_loop(&url, seconds, || {
                let start = next % (traces.len() - TRACES_PER_REQUEST);
                next += TRACES_PER_REQUEST;
                Bytes::from(v04::encode(
                    &traces[start..start + TRACES_PER_REQUEST],
                    &SpanDefaults::default(),
                ))
            }));
            println!("{out}");
        }
        "encode" => {
            // Encoding alone (no HTTP): CPU per span of the v0.4 encoder.
            let traces: Vec<Trace> = (0..1_000u64).map(|n| workload_trace(n, &shape)).collect();
            let d = SpanDefaults::default();
            let cpu0 = process_cpu();
            let rounds = 20;
            let mut bytes = 0;
            for _ in 0..rounds {
                for chunk in traces.chunks(TRACES_PER_REQUEST) {
                    bytes += v04::encode(chunk, &d).len();
                }
            }
            let spans = (rounds * traces.len() * SPANS_PER_TRACE) as f64;
            let cpu = (process_cpu() - cpu0).as_secs_f64();
            println!(
                "{}",
                serde_json::json!({"encode_cpu_us_per_span": cpu * 1e6 / spans, "bytes": bytes})
            );
        }
        _ => {
            eprintln!("usage: exporter-bench sink [--port P] [--hang] | ceiling --url U [--seconds S] | limit --url U [--seconds S] [--ids ddtrace|random64] | encode [--ids ddtrace|random64]");
            std::process::exit(2);
        }
    }
}
