# frozen_string_literal: true

module Exporter
  # Serialises a transport's sends and lets a fork in between them.
  #
  # `synchronize` runs one send at a time. `acquire_for_fork` (the at_fork
  # :before hook) marks a fork as pending, so new sends wait, then waits for
  # the send in flight to end: Ruby's Mutex is not fair, and without the
  # pending mark a thread sending back-to-back could starve the fork.
  # `release_after_fork` undoes it in the parent; in the child the lock is
  # rebuilt, since threads that waited on it do not exist there.
  #
  # In a trap handler Ruby forbids Mutex operations; a fork from there
  # cannot wait for a send and proceeds (the native side then abandons that
  # send cleanly rather than hanging).
  class SendLock
    def initialize
      reset
    end

    # Runs the block as the only send in flight. In a trap handler (where
    # Ruby forbids Mutex) the block runs unserialised.
    def synchronize
      begin
        @mutex.synchronize do
          @cond.wait(@mutex) while @busy || @forks_pending.positive?
          @busy = true
        end
      rescue ThreadError # trap context
        return yield
      end
      begin
        yield
      ensure
        @mutex.synchronize do
          @busy = false
          @cond.broadcast
        end
      end
    end

    def acquire_for_fork
      @mutex.synchronize do
        @forks_pending += 1
        @cond.wait(@mutex) while @busy
      end
    rescue ThreadError # trap context
      nil
    end

    def release_after_fork(in_child:)
      return reset if in_child

      @mutex.synchronize do
        @forks_pending -= 1 if @forks_pending.positive?
        @cond.broadcast
      end
    rescue ThreadError # trap context
      nil
    end

    private

    def reset
      @mutex = Mutex.new
      @cond = ConditionVariable.new
      @busy = false
      @forks_pending = 0
      nil
    end
  end
end
