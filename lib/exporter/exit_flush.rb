# frozen_string_literal: true

module Exporter
  # Flushes every live Writer and Exposures when the process exits, within
  # one time budget, so short-lived processes and gracefully stopped
  # workers lose nothing that was queued. Holds its objects weakly.
  module ExitFlush
    TIMEOUT = 5.0

    # The flush-then-stop lifecycle shared by Writer and Exposures, over
    # their native `_flush(seconds)` and `_stop`.
    module Flushable
      DEFAULT_TIMEOUT = 5.0

      # True when everything queued so far was accepted by the agent within
      # `timeout` seconds; false on timeout, or if some of it (since the
      # previous flush) failed or was dropped. Releases the GVL while waiting.
      def flush(timeout: DEFAULT_TIMEOUT)
        seconds = Float(timeout, exception: false) if timeout.is_a?(Numeric) || timeout.is_a?(String)
        raise ArgumentError, "timeout must be a number of seconds (got #{timeout.inspect})" unless seconds

        _flush(seconds)
      end

      def stopped? = @stopped == true

      # Items accepted and not yet settled (sent, failed or dropped): what
      # would be lost if the process ended now.
      def unsent = stats[:queued]

      private

      # Flushes (bounded by `timeout`), then stops for good: later items are
      # dropped. Idempotent; returns the flush result.
      def flush_and_stop(timeout)
        return true if @stopped

        flushed = flush(timeout: timeout)
        @stopped = true
        _stop
        flushed
      end
    end

    @live = ObjectSpace::WeakMap.new

    class << self
      def register(flushable)
        @live[flushable] = true
        flushable
      end

      # Flushes every live object within `timeout` seconds in all, then
      # reports, in one line to `log`, what is still unsent and so lost
      # with the process, per kind. Returns that count per kind.
      def run(timeout: TIMEOUT, log: $stderr)
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
        Runtime.resume_if_left_paused
        Native.exiting # a sidecar handover now waits 2 s at most, leaving time to send direct
        live = @live.keys.reject(&:stopped?)
        live.each do |f|
          left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
          break if left <= 0

          f.flush(timeout: left)
        end
        flush_sidecar(deadline)
        report_unsent(live, timeout, log)
      end

      private

      # In a sidecar listener (the master), what the workers handed over.
      def flush_sidecar(deadline)
        left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
        Sidecar.flush(timeout: left) if left.positive?
      rescue StandardError
        nil
      end

      def report_unsent(live, timeout, log)
        unsent = Hash.new(0)
        problems = []
        sidecar_unsent(unsent)
        live.each do |f|
          n = f.unsent
          next unless n.positive?

          unsent[f.class::UNSENT_NOUN] += n
          problems << f.stats[:last_error] if f.stats[:last_error]
        end
        return unsent if unsent.empty?

        counts = unsent.sort.map { |noun, n| "#{n} #{noun}" }.join(", ")
        cause = problems.empty? ? "" : " (last problem: #{problems.uniq.first(2).join('; ')})"
        log&.puts("exporter: at exit, #{counts} could not be sent within #{timeout} s and are lost#{cause}")
        unsent
      rescue StandardError
        unsent
      end

      def sidecar_unsent(unsent)
        c = Sidecar.status[:counters]
        unsent["trace payloads handed over by workers"] += c[:trace_bodies_pending].to_i
        unsent["exposures handed over by workers"] += c[:exposures_pending].to_i
        unsent["flag evaluations handed over by workers"] += c[:evaluations_pending].to_i
        unsent.delete_if { |_, n| n.zero? }
      end
    end
  end
end

at_exit { Exporter::ExitFlush.run }
