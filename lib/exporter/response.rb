# frozen_string_literal: true

module Exporter
  # What one `Transport#send_traces` did. Agent and network failures are
  # reported here, never raised.
  class Response
    # HTTP status of the last answer from the agent (nil if none came).
    attr_reader :status
    # Traces the agent accepted.
    attr_reader :trace_count
    # Traces not delivered after retries (or because the transport is closed).
    attr_reader :failed_count
    # Traces whose last attempt timed out after the request was sent: not
    # confirmed, but the agent may have received them (not in failed_count).
    attr_reader :timed_out_count
    # Traces dropped because alone they exceed the payload limit.
    attr_reader :dropped_count
    # HTTP requests made, retries included.
    attr_reader :requests
    # {"service:NAME,env:ENV" => rate} from the agent's last answer.
    attr_reader :rate_by_service
    # The first problem met, as a message (nil when all went well).
    attr_reader :error

    def initialize(status: nil, trace_count: 0, failed_count: 0, timed_out_count: 0, dropped_count: 0,
                   requests: 0, rate_by_service: {}, error: nil)
      @status = status
      @trace_count = trace_count
      @failed_count = failed_count
      @timed_out_count = timed_out_count
      @dropped_count = dropped_count
      @requests = requests
      @rate_by_service = rate_by_service.freeze
      @error = error
      freeze
    end

    # True when every trace given was accepted by the agent.
    def ok?
      error.nil? && failed_count.zero? && timed_out_count.zero? && dropped_count.zero?
    end

    def to_h
      { status: status, trace_count: trace_count, failed_count: failed_count, timed_out_count: timed_out_count,
        dropped_count: dropped_count, requests: requests, rate_by_service: rate_by_service, error: error }
    end

    def inspect
      "#<#{self.class} ok?=#{ok?} #{to_h.map { |k, v| "#{k}=#{v.inspect}" }.join(' ')}>"
    end
  end
end
