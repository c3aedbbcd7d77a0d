# frozen_string_literal: true

module Exporter
  # Feature-flag evaluation counts: every evaluation is counted in an
  # aggregated row (flag, variant, allocation, error, targeting key,
  # context) and the rows are sent in the background through the agent's
  # EVP proxy (POST /evp_proxy/v2/api/v2/flagevaluation).
  #
  #   evals = Exporter::FlagEvaluations.new(service: "shop")
  #   evals.record(flag: "new-checkout", variant: "on", allocation: "rollout-10",
  #                targeting_key: "user-42", context: { "plan" => "pro" })
  #   evals.close
  #
  # `record` holds the GVL only to copy its arguments into a native bounded
  # queue; keying, pruning, hashing, aggregation, JSON and HTTP run natively
  # on the shared runtime. Without `full_data: true` (consent), the
  # targeting key is sent as "sha256_<hex>", no context is kept, and the
  # error message is the error code. Fork: a child starts empty; what the
  # parent recorded is sent by the parent. At exit, rows are flushed (see
  # `ExitFlush`). DD_FLAGGING_EVALUATION_COUNTS_ENABLED=false (or 0) turns
  # it all off: `record` returns false and no worker runs.
  class FlagEvaluations
    include ExitFlush::Flushable

    DEFAULT_FLUSH_INTERVAL = 10.0
    DEFAULT_QUEUE_SIZE = 4096
    MAX_PAYLOAD_SIZE = 5 * 1024 * 1024
    # What `ExitFlush` calls the items it could not send.
    UNSENT_NOUN = "flag evaluations"

    def self.new(url: nil, service: nil, env: nil, version: nil, flush_interval: DEFAULT_FLUSH_INTERVAL,
                 queue_size: DEFAULT_QUEUE_SIZE, timeout: nil, max_payload_size: MAX_PAYLOAD_SIZE)
      opts = {
        enabled: Config.flag_evaluation_counts_enabled?,
        **Config.sender_options(url: url, timeout: timeout, service: service, env: env, version: version),
        flush_interval: Args.seconds(:flush_interval, flush_interval),
        queue_size: Args.integer(:queue_size, queue_size),
        max_payload_size: Args.integer(:max_payload_size, max_payload_size)
      }
      evaluations = _native_new(opts)
      evaluations.enabled? ? ExitFlush.register(evaluations) : evaluations
    end

    # Counts one evaluation of `flag`. True when queued; false when dropped
    # (queue full, counted), disabled by the killswitch, or closed.
    # `variant: nil` means the runtime default was used. `context` is a
    # Hash (String or Symbol keys), kept only with `full_data: true`.
    # `timestamp_ms` defaults to now. Raises ArgumentError naming the
    # argument for a non-String flag, variant, allocation, targeting_key,
    # error_code or error_message, a non-Hash context or a non-Integer
    # timestamp_ms.
    def record(flag:, variant: nil, allocation: nil, targeting_key: nil, context: nil,
               error_code: nil, error_message: nil, timestamp_ms: nil, full_data: false)
      _record(flag, variant, allocation, targeting_key, context, error_code, error_message, timestamp_ms,
              full_data, false)
    end

    # Flushes (bounded by `timeout`), then stops the worker. Later records
    # return false. Idempotent; returns the flush result.
    def close(timeout: DEFAULT_TIMEOUT) = flush_and_stop(timeout)

    # Evaluations recorded and not yet settled (see `ExitFlush`).
    def unsent = stats[:pending]
  end
end
