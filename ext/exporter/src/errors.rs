//! The Ruby exception classes the extension raises (defined in Ruby, in
//! `lib/exporter/errors.rb`, and looked up once).

use magnus::value::Lazy;
use magnus::{Error, ExceptionClass, Module, RModule, Ruby};

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
