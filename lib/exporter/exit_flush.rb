# frozen_string_literal: true

module Exporter
  # Flushes every live Writer and Exposures when the process exits, within
  # one time budget, so short-lived processes and gracefully stopped
  # workers lose nothing that was queued. Holds its objects weakly.
  module ExitFlush
    TIMEOUT = 5.0

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
