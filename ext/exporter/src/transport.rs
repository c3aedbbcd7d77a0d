//! `Exporter::Transport`, native half: configuration in, `send_traces` out.
//!
//! The Ruby half (`lib/exporter/transport.rb`) resolves defaults from the
//! environment, builds the `Response` and wires the fork hooks. Here we
//! only convert at the boundary and run the send on the shared runtime,
//! waiting for it with the GVL released (see `crate::gvl`).

use std::sync::Arc;
use std::time::Duration;

use exporter_core::agent::{Config, SendReport, TraceExporter};
use exporter_core::encode::Protocol;
use exporter_core::retry::RetryPolicy;
use exporter_core::span::{SpanDefaults, Trace, TRACE_POOL};
use magnus::{function, method, prelude::*, Error, RHash, RModule, Ruby, Symbol, Value};

use crate::gvl::{self, Ran};
use crate::{convert, errors};

#[magnus::wrap(class = "Exporter::Transport", free_immediately, size)]
pub struct Transport {
    exporter: Arc<TraceExporter>,
}

fn seconds(ruby: &Ruby, opts: RHash, key: &str) -> Result<Duration, Error> {
    errors::seconds(ruby, key, errors::option(ruby, opts, key)?)
}

impl Transport {
    /// `Transport._native_new(opts)`: `opts` has every key, already
    /// defaulted by the Ruby side.
    fn native_new(ruby: &Ruby, opts: RHash) -> Result<Transport, Error> {
        let protocol: Symbol = errors::option(ruby, opts, "protocol")?;
        let protocol_name = protocol.name()?;
        let protocol = Protocol::parse(&protocol_name).ok_or_else(|| {
            errors::argument(
                ruby,
                format!("protocol must be :v04 or :v05 (got :{protocol_name})"),
            )
        })?;
        let max_payload = errors::positive(
            ruby,
            "max_payload_size",
            errors::option(ruby, opts, "max_payload_size")?,
        )?;
        let max_retries: i64 = errors::option(ruby, opts, "max_retries")?;
        if !(0..=100).contains(&max_retries) {
            return Err(errors::argument(
                ruby,
                "max_retries must be between 0 and 100",
            ));
        }
        let config = Config {
            url: errors::option(ruby, opts, "url")?,
            protocol,
            timeout: seconds(ruby, opts, "timeout")?,
            deadline: seconds(ruby, opts, "deadline")?,
            retry: RetryPolicy {
                max_retries: max_retries as u32,
                ..RetryPolicy::default()
            },
            max_payload,
            defaults: SpanDefaults {
                service: errors::option(ruby, opts, "service")?,
                env: errors::option(ruby, opts, "env")?,
                version: errors::option(ruby, opts, "version")?,
            },
            lang_version: errors::option(ruby, opts, "lang_version")?,
            lang_interpreter: errors::option(ruby, opts, "lang_interpreter")?,
            tracer_version: errors::option(ruby, opts, "tracer_version")?,
            container_id: None,
        };
        let exporter = TraceExporter::new(config).map_err(|e| errors::argument(ruby, e))?;
        Ok(Transport {
            exporter: Arc::new(exporter),
        })
    }

    /// Sends already-converted traces and waits without the GVL.
    fn send_converted(&self, ruby: &Ruby, traces: Vec<Trace>) -> Result<SendReport, Error> {
        let count = traces.len();
        if count == 0 {
            return Ok(SendReport::default());
        }
        let exporter = self.exporter.clone();
        Ok(
            match gvl::run(ruby, move |generation| async move {
                let report = exporter.send(&traces, generation, None).await;
                TRACE_POOL.give(traces);
                report
            })? {
                Ran::Done(report) => report,
                Ran::Abandoned => {
                    SendReport::failed(count, "send abandoned: the process forked during it".into())
                }
                Ran::NoRuntime(e) => SendReport::failed(count, e.to_string()),
            },
        )
    }

    /// `#_send_traces(traces)`: a Hash for `Exporter::Response.new`.
    fn send_traces(ruby: &Ruby, rb_self: &Self, traces: Value) -> Result<RHash, Error> {
        let traces = convert::traces(ruby, traces)?;
        let report = rb_self.send_converted(ruby, traces)?;
        report_to_hash(ruby, &report)
    }

    /// The shared exporter, for writers built on this transport.
    pub fn exporter(&self) -> Arc<TraceExporter> {
        self.exporter.clone()
    }

    fn close(&self) {
        self.exporter.close();
    }

    fn is_closed(&self) -> bool {
        self.exporter.is_closed()
    }

    fn url(&self) -> String {
        self.exporter.config().url.clone()
    }
}

/// The report as a Hash of Symbol keys.
pub fn report_to_hash(ruby: &Ruby, r: &SendReport) -> Result<RHash, Error> {
    let h = ruby.hash_new();
    h.aset(ruby.to_symbol("status"), r.status)?;
    h.aset(ruby.to_symbol("trace_count"), r.trace_count)?;
    // Not delivered, split by what we know: surely not received, or timed
    // out after being sent (the agent may have them).
    h.aset(
        ruby.to_symbol("failed_count"),
        r.failed_traces - r.timed_out_traces,
    )?;
    h.aset(ruby.to_symbol("timed_out_count"), r.timed_out_traces)?;
    h.aset(ruby.to_symbol("dropped_count"), r.oversized_traces)?;
    h.aset(ruby.to_symbol("requests"), r.requests)?;
    let rates = ruby.hash_new();
    for (k, v) in &r.rate_by_service {
        rates.aset(k.as_str(), *v)?;
    }
    h.aset(ruby.to_symbol("rate_by_service"), rates)?;
    h.aset(ruby.to_symbol("error"), r.error.as_deref())?;
    Ok(h)
}

pub fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let class = module.define_class("Transport", ruby.class_object())?;
    class.define_singleton_method("_native_new", function!(Transport::native_new, 1))?;
    class.define_method("_send_traces", method!(Transport::send_traces, 1))?;
    class.define_method("_close", method!(Transport::close, 0))?;
    class.define_method("closed?", method!(Transport::is_closed, 0))?;
    class.define_method("url", method!(Transport::url, 0))?;
    Ok(())
}
