//! When to retry a request and how long to wait first.
//!
//! Only outcomes that can succeed later are retried: connection errors,
//! timeouts, 408, 429 and 5xx. A 400 or 413 (or any other 4xx) never will.
//! Waits grow exponentially with full jitter, a `Retry-After` from the
//! server replaces the computed wait, and no wait may cross the send's
//! total deadline.

use std::time::Duration;

/// The outcome of one attempt, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The agent answered with this status.
    Status(u16),
    /// Connecting failed (refused, no such socket, DNS).
    ConnectError,
    /// The attempt timed out, or the connection broke mid-request.
    Timeout,
}

impl Attempt {
    /// Whether trying again could give a different answer.
    pub fn is_retryable(self) -> bool {
        match self {
            Attempt::Status(s) => s == 408 || s == 429 || (500..=599).contains(&s),
            Attempt::ConnectError | Attempt::Timeout => true,
        }
    }
}

/// Retry settings of a transport.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Wait before the first retry, before jitter.
    pub base_delay: Duration,
    /// Upper bound of one computed wait.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// How long to wait before retry number `retry` (0-based), given the
    /// server's `Retry-After` if any, and what remains of the deadline.
    /// `None` means: do not retry.
    ///
    /// `jitter` is a uniform sample in `[0, 1)`; it is a parameter so the
    /// policy stays deterministic under test.
    pub fn delay(
        &self,
        retry: u32,
        outcome: Attempt,
        retry_after: Option<Duration>,
        remaining: Duration,
        jitter: f64,
    ) -> Option<Duration> {
        if retry >= self.max_retries || !outcome.is_retryable() {
            return None;
        }
        let wait = match retry_after {
            Some(d) => d,
            None => {
                let exp = self
                    .base_delay
                    .saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
                    .min(self.max_delay);
                // Full jitter, but never less than half the step, so retries
                // do not fire back-to-back.
                exp.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
            }
        };
        // A retry needs time to wait and then to make the attempt.
        (wait < remaining).then_some(wait)
    }
}

/// Parses a `Retry-After` header value given in seconds (the HTTP-date form
/// is not used by the agent and is ignored).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

/// A cheap jitter source: no need for cryptographic randomness here.
pub fn jitter() -> f64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn retries_only_what_can_succeed_later() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(Attempt::Status(s).is_retryable(), "{s}");
        }
        for s in [200, 202, 400, 401, 403, 404, 413, 415] {
            assert!(!Attempt::Status(s).is_retryable(), "{s}");
        }
        assert!(Attempt::ConnectError.is_retryable());
        assert!(Attempt::Timeout.is_retryable());
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let p = RetryPolicy {
            max_retries: 10,
            ..Default::default()
        };
        let d = |r, j| p.delay(r, Attempt::Timeout, None, LONG, j).unwrap();
        assert_eq!(d(0, 1.0), Duration::from_millis(100));
        assert_eq!(d(0, 0.0), Duration::from_millis(50));
        assert_eq!(d(1, 1.0), Duration::from_millis(200));
        assert_eq!(d(3, 1.0), Duration::from_millis(800));
        assert_eq!(d(9, 1.0), Duration::from_secs(2));
        assert!(d(2, 0.3) < d(2, 0.7));
    }

    #[test]
    fn stops_after_max_retries_and_on_final_status() {
        let p = RetryPolicy::default();
        assert!(p.delay(2, Attempt::Status(503), None, LONG, 0.5).is_some());
        assert!(p.delay(3, Attempt::Status(503), None, LONG, 0.5).is_none());
        assert!(p.delay(0, Attempt::Status(400), None, LONG, 0.5).is_none());
        assert!(p.delay(0, Attempt::Status(413), None, LONG, 0.5).is_none());
    }

    #[test]
    fn retry_after_wins_but_not_past_the_deadline() {
        let p = RetryPolicy::default();
        let ra = Some(Duration::from_secs(1));
        assert_eq!(
            p.delay(0, Attempt::Status(429), ra, LONG, 0.0),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            p.delay(0, Attempt::Status(429), ra, Duration::from_millis(500), 0.0),
            None
        );
        assert_eq!(
            p.delay(0, Attempt::Timeout, None, Duration::from_millis(10), 1.0),
            None
        );
    }

    #[test]
    fn parses_retry_after_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn jitter_is_in_unit_interval() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }
}
