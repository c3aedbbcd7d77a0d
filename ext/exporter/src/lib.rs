//! The `exporter` Ruby extension (magnus).
//!
//! One file per Ruby class or module; each converts at the boundary and
//! delegates to `exporter_core`, which owns all behaviour:
//! - `transport`: `Exporter::Transport`
//! - `writer`: `Exporter::Writer`
//! - `exposures`: `Exporter::Exposures`
//! - `flag_evaluations`: `Exporter::FlagEvaluations`
//! - `native`: `Exporter::Native` (runtime fork lifecycle)
//! - `sidecar`: `Exporter::Sidecar` (mode, start, flush, status)
//! - `convert`: Ruby spans to core spans (the GVL-held part)
//! - `gvl`: waiting without the GVL, with a cancelling unblock function

mod convert;
mod errors;
mod exposures;
mod flag_evaluations;
mod gvl;
mod native;
mod sidecar;
mod transport;
mod writer;

use magnus::{Error, Ruby};

#[magnus::init]
fn init(ruby: &Ruby) -> Result<(), Error> {
    convert::init(ruby);
    let module = ruby.define_module("Exporter")?;
    transport::init(ruby, module)?;
    writer::init(ruby, module)?;
    exposures::init(ruby, module)?;
    flag_evaluations::init(ruby, module)?;
    native::init(module)?;
    sidecar::init(ruby, module)?;
    Ok(())
}
