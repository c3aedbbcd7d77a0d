//! The Ruby exception classes the extension raises (defined in Ruby, in
//! `lib/exporter/errors.rb`, and looked up once), and reading options.

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
