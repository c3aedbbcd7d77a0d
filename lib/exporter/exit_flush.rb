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
        _flush(Float(timeout))
      end

      def stopped? = @stopped == true

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

      def run(timeout: TIMEOUT)
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
        @live.each_key do |f|
          left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
          break if left <= 0

          f.flush(timeout: left) unless f.stopped?
        end
      end
    end
  end
end

at_exit { Exporter::ExitFlush.run }
