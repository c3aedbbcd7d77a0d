# frozen_string_literal: true

require_relative "lib/exporter/version"

Gem::Specification.new do |s|
  s.name = "exporter"
  s.version = Exporter::VERSION
  s.summary = "Datadog trace export for Ruby with a native, GVL-free, fork-safe core"
  s.description = "Encodes and sends traces to the Datadog agent from Rust (tokio + hyper) " \
                  "with the GVL released, interrupts honoured, and a runtime that survives fork."
  s.authors = ["exporter developers"]
  s.license = "Apache-2.0"
  s.required_ruby_version = ">= 3.1"
  s.files = Dir[
    "lib/**/*.rb", "sig/**/*.rbs", "ext/**/*.{rs,rb,toml}", "Cargo.toml", "Cargo.lock",
    "README.md", "exporter.gemspec"
  ].reject { |f| f.include?("/target/") }
  s.require_paths = ["lib"]
  s.extensions = ["ext/exporter/extconf.rb"]
end
