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
        live = @live.keys.reject(&:stopped?)
        live.each do |f|
          left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
          break if left <= 0

          f.flush(timeout: left)
        end
        report_unsent(live, timeout, log)
      end

      private

      def report_unsent(live, timeout, log)
        unsent = Hash.new(0)
        problems = []
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
    end
  end
end

at_exit { Exporter::ExitFlush.run }
