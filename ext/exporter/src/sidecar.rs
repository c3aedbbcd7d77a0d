//! `Exporter::Sidecar`, native half: mode, start, flush and status of
//! `exporter_core::sidecar`. The Ruby half (`lib/exporter/sidecar.rb`)
//! reads `EXPORTER_SIDECAR` and checks arguments.

use exporter_core::sidecar::{self, Mode, Role};
use magnus::{function, prelude::*, Error, RHash, RModule, Ruby};

use crate::errors;
use crate::gvl::{self, Ran};

/// `_configure(mode, gem_version)`; mode is "auto", "thread",
/// "subprocess" or "off".
fn configure(ruby: &Ruby, mode: String, gem_version: String) -> Result<(), Error> {
    let mode = Mode::parse(&mode)
        .ok_or_else(|| errors::argument(ruby, format!("unknown sidecar mode {mode:?}")))?;
    sidecar::configure(mode, &gem_version);
    Ok(())
}

/// `_start`: nil when this process is now a listener, else why not.
fn start() -> Option<String> {
    sidecar::start().err().map(|e| e.to_string())
}

/// `_flush(seconds)`: true when the listener's agent accepted everything
/// it held, within the timeout. Waits without the GVL.
fn flush(ruby: &Ruby, timeout: f64) -> Result<bool, Error> {
    let limit = errors::wait(ruby, timeout)?;
    let flushed = sidecar::flush();
    match gvl::run(ruby, move |_| async move {
        tokio::time::timeout(limit, flushed).await.unwrap_or(false)
    })? {
        Ran::Done(ok) => Ok(ok),
        _ => Ok(false),
    }
}

fn status(ruby: &Ruby) -> Result<RHash, Error> {
    let s = sidecar::status();
    let h = ruby.hash_new();
    let mode = if s.thread_mode { "thread" } else { "direct" };
    h.aset(ruby.to_symbol("mode"), ruby.to_symbol(mode))?;
    let role = match s.role {
        Role::None => "none",
        Role::Listener => "listener",
        Role::Client => "client",
    };
    h.aset(ruby.to_symbol("role"), ruby.to_symbol(role))?;
    h.aset(ruby.to_symbol("socket"), ())?;
    let configured = match s.configured {
        Mode::Auto => "auto",
        Mode::Thread => "thread",
        Mode::Subprocess => "subprocess",
        Mode::Off => "off",
    };
    h.aset(ruby.to_symbol("configured"), ruby.to_symbol(configured))?;
    let counters = ruby.hash_new();
    for (k, v) in s.counters {
        counters.aset(ruby.to_symbol(k), v)?;
    }
    h.aset(ruby.to_symbol("counters"), counters)?;
    Ok(h)
}

pub fn init(ruby: &Ruby, module: RModule) -> Result<(), Error> {
    let m = module.define_module("Sidecar")?;
    let _ = ruby;
    m.define_singleton_method("_configure", function!(configure, 2))?;
    m.define_singleton_method("_start", function!(start, 0))?;
    m.define_singleton_method("_flush", function!(flush, 1))?;
    m.define_singleton_method("_status", function!(status, 0))?;
    Ok(())
}
