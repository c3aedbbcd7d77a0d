//! The Ruby-free core of the `exporter` gem.
//!
//! Everything here runs without a Ruby VM and is tested with `cargo test`:
//! the span model ([`span`]), msgpack encoders ([`encode`]), payload
//! splitting ([`split`]), the retry policy ([`retry`]), the HTTP client
//! ([`http`]), trace sending ([`agent`]), and the process-wide runtime with
//! its fork lifecycle ([`runtime`], [`worker`]), and asynchronous batching
//! ([`batch`]) used by the trace writer and feature-flag exposures, and
//! feature-flag evaluation counts ([`flags`]). The magnus extension only
//! converts Ruby values into these types and delegates.

pub mod agent;
pub mod batch;
pub mod block_on;
pub mod encode;
pub mod exposures;
pub mod flags;
pub mod http;
pub mod log;
pub mod recycle;
pub mod retry;
pub mod runtime;
pub mod sidecar;
pub mod span;
pub mod split;
#[cfg(test)]
pub mod test_http;
pub mod worker;
