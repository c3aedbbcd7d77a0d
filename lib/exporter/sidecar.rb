# frozen_string_literal: true

require "json"
require "rbconfig"

module Exporter
  # One sender for many processes (README, "Sidecar"). Thread mode: the
  # forking parent runs a listener on its native runtime and each child
  # hands its traces, exposures and evaluation counts over a connection
  # inherited through fork. Subprocess mode: processes with no forking
  # parent hand them to a per-user helper process (`exporter-sidecar`,
  # installed beside the extension) behind a socket in a 0700 directory.
  # Either way, anything not acknowledged is sent direct.
  module Sidecar
    MODES = %w[auto thread subprocess off].freeze
    START_MODES = %i[thread].freeze
    # The helper binary's name, beside the extension.
    HELPER = "exporter-sidecar"
    # Largest EXPORTER_SIDECAR_IDLE_SECONDS accepted.
    MAX_IDLE_SECONDS = 86_400

    class << self
      # Reads EXPORTER_SIDECAR (auto | thread | subprocess | off; default
      # auto), EXPORTER_SIDECAR_SOCKET and EXPORTER_SIDECAR_IDLE_SECONDS
      # once, on require.
      def install!(env: ENV, log: $stderr)
        _configure(mode_from(env, log), VERSION)
        why = _configure_helper(socket_from(env), helper_path, idle_from(env, log))
        log&.puts("exporter: EXPORTER_SIDECAR_SOCKET: #{why}: no helper") if why
        nil
      end

      # Makes this process a listener now, so the children it forks next
      # hand their payloads over to it. For masters that load the gem but
      # not the app: `before_fork { Exporter::Sidecar.start }`. Returns
      # true when this process is a listener; false (with a warning) in a
      # worker, in subprocess mode, or when the sidecar is off.
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

      # The counters of the per-user helper at `socket` (default: the one
      # this process uses or would use), asked on a connection of its own:
      # {pid:, gem_version:, connections:, peers_refused:,
      # traces_received:, traces_sent:, ...}; nil when no helper answers
      # within `timeout` seconds. Never starts one.
      def helper_status(socket: nil, timeout: 2.0)
        seconds = Float(timeout, exception: false) if timeout.is_a?(Numeric)
        raise ArgumentError, "timeout must be a number of seconds (got #{timeout.inspect})" unless seconds
        raise ArgumentError, "socket must be a String path (got #{socket.inspect})" unless socket.nil? || socket.is_a?(String)

        json, = _helper_status(socket, seconds)
        json && JSON.parse(json, symbolize_names: true)
      end

      # Sends what the listener holds; true when the agent accepted all of
      # it within `timeout` seconds (true at once with no listener).
      def flush(timeout: 5.0)
        seconds = Float(timeout, exception: false) if timeout.is_a?(Numeric)
        raise ArgumentError, "timeout must be a number of seconds (got #{timeout.inspect})" unless seconds

        _flush(seconds)
      end

      # Where the helper binary is installed: beside the loaded extension.
      def helper_path
        so = $LOADED_FEATURES.find { |f| f.end_with?("/exporter/exporter.#{RbConfig::CONFIG['DLEXT']}") }
        path = so && File.join(File.dirname(so), HELPER)
        path if path && File.executable?(path)
      end

      private

      def mode_from(env, log)
        value = env.fetch("EXPORTER_SIDECAR", "").strip.downcase
        return "auto" if value.empty?

        unless MODES.include?(value)
          log&.puts("exporter: EXPORTER_SIDECAR=#{value.inspect} is not one of #{MODES.join(', ')}: using auto")
          return "auto"
        end
        value
      end

      def socket_from(env)
        value = env.fetch("EXPORTER_SIDECAR_SOCKET", "").strip
        value.empty? ? nil : value
      end

      def idle_from(env, log)
        value = env.fetch("EXPORTER_SIDECAR_IDLE_SECONDS", "").strip
        return nil if value.empty?

        seconds = Integer(value, 10, exception: false)
        return seconds if seconds&.between?(1, MAX_IDLE_SECONDS)

        log&.puts("exporter: EXPORTER_SIDECAR_IDLE_SECONDS=#{value.inspect} is not 1..#{MAX_IDLE_SECONDS}: " \
                  "using the helper's default")
        nil
      end
    end
  end
end
