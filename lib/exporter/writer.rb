# frozen_string_literal: true

module Exporter
  # Asynchronous trace writer. `write` converts and validates the trace on
  # the calling thread and queues it in a native bounded buffer; a native
  # flusher on the shared runtime batches, encodes and sends it without ever
  # taking the GVL. There is no Ruby writer thread.
  #
  # Drop policy: when `buffer_size` traces are queued, new traces are
  # dropped (counted in `stats[:dropped]`) until the flusher catches up.
  # Every trace written ends up in `sent`, `failed`, `dropped`, or is still
  # `queued`.
  #
  # Fork: the flusher pauses before fork and resumes in the parent; a child
  # starts with an empty buffer (the parent sends what was queued) and fresh
  # stats. At exit, live writers are flushed (see `ExitFlush`).
  class Writer
    DEFAULT_BUFFER_SIZE = 1000
    DEFAULT_FLUSH_INTERVAL = 1.0
    DEFAULT_TIMEOUT = 5.0

    def self.new(transport:, buffer_size: DEFAULT_BUFFER_SIZE, flush_interval: DEFAULT_FLUSH_INTERVAL)
      raise ArgumentError, "transport must be an Exporter::Transport" unless transport.is_a?(Transport)
      raise ArgumentError, "buffer_size must be an Integer" unless buffer_size.is_a?(Integer)
      raise ArgumentError, "flush_interval must be Numeric" unless flush_interval.is_a?(Numeric)

      writer = _native_new(transport, buffer_size, flush_interval.to_f)
      writer.instance_variable_set(:@transport, transport)
      ExitFlush.register(writer)
    end

    attr_reader :transport

    # True when every trace written so far was accepted by the agent within
    # `timeout` seconds; false on timeout, or if one of them (since the
    # previous flush) failed or was dropped. Releases the GVL while waiting.
    def flush(timeout: DEFAULT_TIMEOUT)
      _flush(Float(timeout))
    end

    # Flushes (bounded by `timeout`), stops the flusher and closes the
    # transport. Later writes are dropped. Idempotent; returns the flush
    # result.
    def stop(timeout: DEFAULT_TIMEOUT)
      return true if @stopped

      flushed = flush(timeout: timeout)
      @stopped = true
      _stop
      @transport.close
      flushed
    end

    def stopped? = @stopped == true
  end

  # Writes inline: each `write` sends the trace through the transport
  # (with the GVL released) and returns whether the agent accepted it.
  class SyncWriter
    attr_reader :transport

    def initialize(transport:)
      raise ArgumentError, "transport must be an Exporter::Transport" unless transport.is_a?(Transport)

      @transport = transport
      @stats = { written: 0, sent: 0, dropped: 0, failed: 0 }
      @lock = Mutex.new
    end

    def write(trace)
      response = @transport.send_traces([trace])
      @lock.synchronize do
        @stats[:written] += 1
        @stats[:sent] += response.trace_count
        @stats[:dropped] += response.dropped_count
        @stats[:failed] += response.failed_count
      end
      response.ok?
    end

    def flush(timeout: nil) = true # rubocop:disable Lint/UnusedMethodArgument

    def stop(timeout: nil) # rubocop:disable Lint/UnusedMethodArgument
      @transport.close
      true
    end

    def stats = @lock.synchronize { @stats.dup }
  end
end
