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
    include ExitFlush::Flushable

    DEFAULT_BUFFER_SIZE = 1000
    DEFAULT_FLUSH_INTERVAL = 1.0
    # What `ExitFlush` calls the items it could not send.
    UNSENT_NOUN = "traces"

    def self.new(transport:, buffer_size: DEFAULT_BUFFER_SIZE, flush_interval: DEFAULT_FLUSH_INTERVAL)
      raise ArgumentError, "transport must be an Exporter::Transport" unless transport.is_a?(Transport)

      writer = _native_new(transport, Args.integer(:buffer_size, buffer_size),
                           Args.seconds(:flush_interval, flush_interval))
      writer.instance_variable_set(:@transport, transport)
      ExitFlush.register(writer)
    end

    attr_reader :transport

    # Flushes (bounded by `timeout`), stops the flusher and closes the
    # transport. Later writes are dropped. Idempotent; returns the flush
    # result.
    def stop(timeout: DEFAULT_TIMEOUT)
      flushed = flush_and_stop(timeout)
      @transport.close
      flushed
    end
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
