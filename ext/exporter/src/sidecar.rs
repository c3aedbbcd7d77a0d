//! `Exporter::Sidecar`, native half: mode, start, flush and status of
//! `exporter_core::sidecar`. The Ruby half (`lib/exporter/sidecar.rb`)
//! reads `EXPORTER_SIDECAR` and checks arguments.

use exporter_core::sidecar::{self, rendezvous, Mode, Role};
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

/// `_configure_helper(socket, binary, idle_seconds)`: where the per-user
/// helper is (nil: the default rendezvous), the helper binary beside this
/// extension (nil: not installed) and its idle period (nil: its default).
/// Nil when set, else why the socket path cannot be used.
fn configure_helper(
    socket: Option<String>,
    binary: Option<String>,
    idle_seconds: Option<u64>,
) -> Option<String> {
    let path = |s: String| rendezvous::path_from_bytes(s.into_bytes());
    sidecar::configure_helper(socket.map(path), binary.map(path), idle_seconds)
        .err()
        .map(|e| e.to_string())
}

/// `_helper_status(socket, seconds)`: `[json, nil]` from the helper at
/// `socket` (nil: the one this process would use), on a connection of its
/// own (never starts one), or `[nil, why]`. Waits without the GVL.
fn helper_status(
    ruby: &Ruby,
    socket: Option<String>,
    timeout: f64,
) -> Result<(Option<String>, Option<String>), Error> {
    let limit = errors::wait(ruby, timeout)?;
    let socket = socket.map(|s| rendezvous::path_from_bytes(s.into_bytes()));
    let ran = gvl::run(ruby, move |_| async move {
        let query = tokio::task::spawn_blocking(move || sidecar::helper_status(socket));
        match tokio::time::timeout(limit, query).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the helper did not answer in time".to_owned()),
        }
    })?;
    Ok(match ran {
        Ran::Done(Ok(json)) => (Some(json), None),
        Ran::Done(Err(why)) => (None, Some(why)),
        _ => (None, Some("interrupted".to_owned())),
    })
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
    let mode = if s.subprocess {
        "subprocess"
    } else if s.thread_mode {
        "thread"
    } else {
        "direct"
    };
    h.aset(ruby.to_symbol("mode"), ruby.to_symbol(mode))?;
    let role = match s.role {
        Role::None => "none",
        Role::Listener => "listener",
        Role::Client => "client",
    };
    h.aset(ruby.to_symbol("role"), ruby.to_symbol(role))?;
    let socket = s.socket.map(|p| p.to_string_lossy().into_owned());
    h.aset(ruby.to_symbol("socket"), socket)?;
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
    m.define_singleton_method("_configure_helper", function!(configure_helper, 3))?;
    m.define_singleton_method("_helper_status", function!(helper_status, 2))?;
    m.define_singleton_method("_start", function!(start, 0))?;
    m.define_singleton_method("_flush", function!(flush, 1))?;
    m.define_singleton_method("_status", function!(status, 0))?;
    Ok(())
}
