# frozen_string_literal: true

module Exporter
  # Feature-flag exposure events, deduplicated and sent in the background
  # through the agent's EVP proxy (POST /evp_proxy/v2/api/v2/exposures).
  #
  #   exposures = Exporter::Exposures.new(service: "shop")
  #   exposures.record(flag: "new-checkout", allocation: "rollout-10", variant: "on",
  #                    subject_id: "user-42", subject_attributes: { "plan" => "pro" })
  #   exposures.close
  #
  # `record` holds the GVL only to read its arguments; deduplication,
  # batching, JSON encoding and HTTP run natively on the shared runtime.
  # Deduplication is an LRU (`dedup_cache_size` entries) keyed by flag and
  # subject id: the same allocation and variant again is suppressed, a
  # changed assignment is sent. A full buffer drops the new event (counted).
  # Fork: the worker pauses before fork and resumes in the parent; a child
  # starts with an empty buffer and an empty dedup cache. At exit, queued
  # events are flushed (see `ExitFlush`).
  class Exposures
    include ExitFlush::Flushable

    DEFAULT_FLUSH_INTERVAL = 1.0
    DEFAULT_BUFFER_SIZE = 65_536
    DEFAULT_DEDUP_CACHE_SIZE = 65_536
    MAX_PAYLOAD_SIZE = 5 * 1024 * 1024
    # What `ExitFlush` calls the items it could not send.
    UNSENT_NOUN = "exposures"

    def self.new(url: nil, service: nil, env: nil, version: nil, flush_interval: DEFAULT_FLUSH_INTERVAL,
                 buffer_size: DEFAULT_BUFFER_SIZE, dedup_cache_size: DEFAULT_DEDUP_CACHE_SIZE, timeout: nil,
                 max_payload_size: MAX_PAYLOAD_SIZE)
      opts = {
        **Config.sender_options(url: url, timeout: timeout, service: service, env: env, version: version),
        flush_interval: Args.seconds(:flush_interval, flush_interval),
        buffer_size: Args.integer(:buffer_size, buffer_size),
        dedup_cache_size: Args.integer(:dedup_cache_size, dedup_cache_size),
        max_payload_size: Args.integer(:max_payload_size, max_payload_size)
      }
      ExitFlush.register(_native_new(opts))
    end

    # Records that `subject_id` was shown `variant` of `flag`. True when the
    # event was queued; false when it was deduplicated or dropped. Raises
    # ArgumentError naming the field for a non-String flag, allocation or
    # variant. Attribute values other than String, Integer, Float, true and
    # false are left out and counted in `stats[:attributes_dropped]`.
    # (Defaults are nil: a static default costs the call nothing.)
    def record(flag:, allocation:, variant:, subject_id:, subject_attributes: nil, timestamp_ms: nil)
      _record(flag, allocation, variant, subject_id, subject_attributes, timestamp_ms)
    end

    # Flushes (bounded by `timeout`), then stops the worker. Later records
    # are dropped. Idempotent; returns the flush result.
    def close(timeout: DEFAULT_TIMEOUT) = flush_and_stop(timeout)
  end
end
