# frozen_string_literal: true

require_relative "exporter/version"
require_relative "exporter/errors"
require_relative "exporter/config"
require_relative "exporter/args"
require_relative "exporter/response"
require_relative "exporter/at_fork"
require_relative "exporter/send_lock"

begin
  require "exporter/exporter"
rescue LoadError => e
  raise LoadError, "exporter: native extension not built (#{e.message}); run bin/setup or `rake compile`"
end

require_relative "exporter/runtime"
require_relative "exporter/sidecar"
require_relative "exporter/transport"
require_relative "exporter/exit_flush"
require_relative "exporter/writer"
require_relative "exporter/exposures"
require_relative "exporter/flag_evaluations"
require_relative "exporter/open_feature/hook"

# Telemetry export for Ruby processes, with a native core: see README.md.
module Exporter
  AtFork.install!
  Runtime.install!
  Sidecar.install!
end
