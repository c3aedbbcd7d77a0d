# frozen_string_literal: true

module Exporter
  # One sender for a whole preforking server (README, "Sidecar"): the
  # forking parent runs a listener on its native runtime, and each child
  # hands its traces, exposures and evaluation counts over a connection
  # inherited through fork, falling back to sending direct for anything
  # not acknowledged.
  module Sidecar
    MODES = %w[auto thread subprocess off].freeze
    START_MODES = %i[thread].freeze

    class << self
      # Reads EXPORTER_SIDECAR (auto | thread | subprocess | off; default
      # auto) once, on require.
      def install!(env: ENV, log: $stderr)
        _configure(mode_from(env, log), VERSION)
      end

      # Makes this process a listener now, so the children it forks next
      # hand their payloads over to it. For masters that load the gem but
      # not the app: `before_fork { Exporter::Sidecar.start }`. Returns
      # true when this process is a listener; false (with a warning) in a
      # worker, or when the sidecar is off.
      def start(mode: :thread, log: $stderr)
        unless START_MODES.include?(mode)
          raise ArgumentError, "mode must be one of #{START_MODES.inspect} (got #{mode.inspect})"
        end

        why = _start
        return true if why.nil?

        log&.puts("exporter: Sidecar.start: #{why}")
        false
      end

      # {mode:, role:, socket:, configured:, counters: {...}}
      def status = _status

      # Sends what the listener holds; true when the agent accepted all of
      # it within `timeout` seconds (true at once with no listener).
      def flush(timeout: 5.0)
        seconds = Float(timeout, exception: false) if timeout.is_a?(Numeric)
        raise ArgumentError, "timeout must be a number of seconds (got #{timeout.inspect})" unless seconds

        _flush(seconds)
      end

      private

      def mode_from(env, log)
        value = env.fetch("EXPORTER_SIDECAR", "").strip.downcase
        return "auto" if value.empty?

        unless MODES.include?(value)
          log&.puts("exporter: EXPORTER_SIDECAR=#{value.inspect} is not one of #{MODES.join(', ')}: using auto")
          return "auto"
        end
        if value == "subprocess"
          log&.puts("exporter: EXPORTER_SIDECAR=subprocess is not available yet: sending direct")
        end
        value
      end
    end
  end
end
