# frozen_string_literal: true

# The benchmark workload: traces of 50 spans (6 meta, 3 metrics), built
# deterministically (one seeded RNG per trace), in one of two id shapes:
#
# - `ddtrace`: what Datadog's Ruby tracer makes: a 128-bit trace id (high
#   32 bits a Unix time, low 64 random; a Bignum), the same object for every
#   span of the trace; span ids random in 1...2**62 (Fixnums); every span
#   but the root has the root's span id as parent (the root's is 0).
# - `random64`: other tracers and bridges (OpenTelemetry, W3C propagation,
#   ids from upstream services): random 64-bit trace, span and parent ids
#   in 1...2**64 (three in four are >= 2**62, i.e. Bignums); the trace id is
#   a separate Integer object per span (as when parsed or computed per
#   span), the parent is the root's span id object.
#
# Same shapes as `workload_trace` in ext/exporter_bench/src/main.rs (the
# native limit); the ids differ in value, not in kind or size.
module Workload
  SPANS_PER_TRACE = 50
  TRACES_PER_REQUEST = 10
  SHAPES = %w[ddtrace random64].freeze
  SEED = 0x5EED

  module_function

  def ids(shape, n)
    rng = Random.new(SEED + n)
    case shape
    when "ddtrace"
      trace_id = ((1_700_000_000 + n) << 96) | rng.rand(1...2**64)
      span_ids = Array.new(SPANS_PER_TRACE) { rng.rand(1...2**62) }
      [Array.new(SPANS_PER_TRACE, trace_id), span_ids]
    when "random64"
      trace_id = rng.rand(1...2**64)
      # A new Integer object per span (a Bignum three times in four).
      trace_ids = Array.new(SPANS_PER_TRACE) { Integer(trace_id.to_s) }
      [trace_ids, Array.new(SPANS_PER_TRACE) { rng.rand(1...2**64) }]
    else
      raise ArgumentError, "unknown id shape #{shape.inspect} (#{SHAPES.join(', ')})"
    end
  end

  def trace(n, shape)
    trace_ids, span_ids = ids(shape, n)
    root_id = span_ids[0]
    Array.new(SPANS_PER_TRACE) do |i|
      {
        trace_id: trace_ids[i],
        span_id: span_ids[i],
        parent_id: i.zero? ? 0 : root_id,
        name: i.zero? ? "rack.request" : "active_record.sql",
        service: "shop-web",
        resource: i.zero? ? "GET /products/:id" : "SELECT products.* FROM products WHERE id = ? /* q#{i % 7} */",
        type: i.zero? ? "web" : "sql",
        start: 1_700_000_000_000_000_000 + (n * 1_000_000) + (i * 1_000),
        duration: 250_000 + (i * 10),
        error: 0,
        meta: {
          "component" => "rack", "http.method" => "GET", "http.url" => "/products/#{n % 100}",
          "env" => "bench", "version" => "1.4.2", "db.system" => "postgresql"
        },
        metrics: { "_sampling_priority_v1" => 1.0, "_dd.measured" => 1.0, "db.row_count" => (i % 10).to_f }
      }
    end
  end

  def traces(count, shape) = Array.new(count) { |n| trace(n, shape) }
end
