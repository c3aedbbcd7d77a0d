# frozen_string_literal: true

module Exporter
  # Sends traces to a Datadog agent. The native half (see
  # ext/exporter/src/transport.rs) converts spans under the GVL and runs the
  # send on the shared runtime with the GVL released.
  #
  #   t = Exporter::Transport.new(url: "http://127.0.0.1:8126")
  #   r = t.send_traces([[{ trace_id: 1, span_id: 1, name: "web.request" }]])
  #   r.ok? # => true
  #   t.close
  class Transport
    PROTOCOLS = %i[v04 v05].freeze
    DEFAULT_MAX_RETRIES = 3

    class << self
      # @param url [String, nil] agent URL: http://host:port or unix:///path
      # @param timeout [Numeric, nil] seconds per attempt
      # @param protocol [Symbol] :v04 or :v05
      # @param deadline [Numeric, nil] seconds for a whole send, retries
      #   included (default: 3 x timeout)
      # @param max_retries [Integer] retries after the first attempt
      # @param max_payload_size [Integer] bytes per request body
      def new(url: nil, timeout: nil, protocol: :v04, service: nil, env: nil, version: nil,
              deadline: nil, max_retries: DEFAULT_MAX_RETRIES,
              max_payload_size: Config::DEFAULT_MAX_PAYLOAD_SIZE)
        timeout = Args.seconds(:timeout, timeout || Config.timeout)
        opts = {
          url: Args.string(:url, url || Config.agent_url),
          timeout: timeout,
          deadline: Args.seconds(:deadline, deadline || [timeout * 3, Args::MAX_SECONDS].min),
          protocol: protocol(protocol),
          max_retries: Args.integer(:max_retries, max_retries, 0..100),
          max_payload_size: Args.integer(:max_payload_size, max_payload_size),
          service: Args.string(:service, service || Config.service),
          env: Args.string(:env, env || Config.env_name),
          version: Args.string(:version, version || Config.version),
          lang_version: RUBY_VERSION,
          lang_interpreter: RUBY_ENGINE,
          tracer_version: VERSION
        }
        transport = _native_new(opts)
        transport.send(:register_fork_hooks)
        transport
      end

      private

      # Built here, not in an instance method, so the hooks capture the
      # lock only and the transport stays collectable.
      def fork_hooks(lock)
        [
          AtFork.at_fork(:before, owner: lock) { lock.acquire_for_fork },
          AtFork.at_fork(:parent, owner: lock) { lock.release_after_fork(in_child: false) },
          AtFork.at_fork(:child, owner: lock) { lock.release_after_fork(in_child: true) }
        ].freeze
      end

      def finalizer(handles)
        proc { remove_fork_hooks(handles) }
      end

      def remove_fork_hooks(handles)
        handles.each { |h| AtFork.remove_at_fork(h.stage, h) }
      end

      def protocol(value)
        sym = value.respond_to?(:to_sym) ? value.to_sym : value
        return sym if PROTOCOLS.include?(sym)

        raise ArgumentError, "protocol must be one of #{PROTOCOLS.inspect} (got #{value.inspect})"
      end
    end

    # Sends `traces` (an Array of traces, each an Array of span Hashes) and
    # returns an `Exporter::Response`. Raises `InvalidTraceError` on bad
    # input, before anything is sent; agent and network failures come back
    # in the response. Releases the GVL while sending; `Thread#kill`,
    # `Thread#raise` and `Timeout` interrupt it promptly.
    def send_traces(traces)
      @send_lock.synchronize { Response.new(**_send_traces(traces)) }
    end

    # Stops sending: later sends fail with "transport is closed", pooled
    # connections are dropped and the fork hooks removed. Idempotent.
    def close
      _close
      handles = @fork_hooks
      @fork_hooks = nil
      if handles
        self.class.send(:remove_fork_hooks, handles)
        ObjectSpace.undefine_finalizer(self)
      end
      nil
    end

    def inspect
      "#<#{self.class} url=#{url.inspect}#{' closed' if closed?}>"
    end

    private

    def register_fork_hooks
      @send_lock = SendLock.new
      @fork_hooks = self.class.send(:fork_hooks, @send_lock)
      ObjectSpace.define_finalizer(self, self.class.send(:finalizer, @fork_hooks))
    end
  end
end
