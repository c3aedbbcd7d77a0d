//! The Ruby exception classes the extension raises (defined in Ruby, in
//! `lib/exporter/errors.rb`, and looked up once), and reading and checking
//! options.

use std::time::Duration;

use magnus::value::Lazy;
use magnus::{Error, ExceptionClass, Module, RHash, RModule, Ruby, TryConvert};

static INVALID_TRACE: Lazy<ExceptionClass> = Lazy::new(|ruby| {
    let module: RModule = ruby
        .class_object()
        .const_get("Exporter")
        .expect("lib/exporter.rb defines Exporter before loading the extension");
    module
        .const_get("InvalidTraceError")
        .expect("lib/exporter/errors.rb defines Exporter::InvalidTraceError")
});

/// An `Exporter::InvalidTraceError` with `msg`.
pub fn invalid_trace(ruby: &Ruby, msg: String) -> Error {
    Error::new(ruby.get_inner(&INVALID_TRACE), msg)
}

/// An `ArgumentError` with `msg`.
pub fn argument(ruby: &Ruby, msg: impl std::fmt::Display) -> Error {
    Error::new(ruby.exception_arg_error(), msg.to_string())
}

/// Option `key` of an options Hash built by the Ruby side (which fills
/// every key with its default); a missing key is a bug there, reported as
/// an `ArgumentError`.
pub fn option<T: TryConvert>(ruby: &Ruby, opts: RHash, key: &str) -> Result<T, Error> {
    opts.lookup::<_, Option<T>>(ruby.to_symbol(key))?
        .ok_or_else(|| argument(ruby, format!("missing option {key}")))
}

/// Longest duration an option accepts (as `Exporter::Args::MAX_SECONDS`).
pub const MAX_SECONDS: f64 = 86_400.0;

/// A positive number of seconds, at most [`MAX_SECONDS`], named `name` in
/// the error (NaN, infinities and huge values included: never a panic).
pub fn seconds(ruby: &Ruby, name: &str, secs: f64) -> Result<Duration, Error> {
    if secs > 0.0 && secs <= MAX_SECONDS {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(argument(
            ruby,
            format!(
                "{name} must be a positive number of seconds, at most {MAX_SECONDS} (got {secs})"
            ),
        ))
    }
}

/// A wait of `secs` (a flush timeout): non-negative, NaN refused; huge
/// values wait "forever" (capped, never an overflow).
pub fn wait(ruby: &Ruby, secs: f64) -> Result<Duration, Error> {
    if secs.is_nan() || secs < 0.0 {
        return Err(argument(
            ruby,
            format!("timeout must be a non-negative number of seconds (got {secs})"),
        ));
    }
    // A century: longer than any process lives, far from overflowing.
    Ok(Duration::try_from_secs_f64(secs.min(3.2e9)).unwrap_or(Duration::MAX))
}

/// A positive size or count, named `name` in the error.
pub fn positive(ruby: &Ruby, name: &str, n: i64) -> Result<usize, Error> {
    usize::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| argument(ruby, format!("{name} must be positive (got {n})")))
}
