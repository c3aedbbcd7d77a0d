//! Feature-flag telemetry: aggregated evaluation counts sent through the
//! agent's EVP proxy (exposures are in [`crate::exposures`] for now).
//!
//! - [`context`]: pruning a captured evaluation context, and its canonical
//!   (exact, type-tagged) key;
//! - [`aggregate`]: privacy, row identity and the two tiers with their caps;
//! - [`encode`]: the JSON bodies, split under the intake's cap;
//! - [`worker`]: the bounded queue, the background task on the shared
//!   runtime (fork lifecycle, retries kept for the next flush, panics
//!   caught) and the accounting.

pub mod aggregate;
pub mod context;
pub mod encode;
pub mod packed;
pub mod worker;

/// The EVP proxy path for evaluation counts (singular).
pub const FLAG_EVALUATIONS_PATH: &str = "/evp_proxy/v2/api/v2/flagevaluation";
/// Evaluations the queue holds by default.
pub const DEFAULT_QUEUE_SIZE: usize = 4_096;
