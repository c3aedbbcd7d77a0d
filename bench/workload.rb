# frozen_string_literal: true

# The benchmark workload: traces of 50 spans with realistic meta and
# metrics and 64-bit ids, deterministic. Same shape as `workload_trace` in
# ext/exporter_bench/src/main.rs (the native limit).
module Workload
  SPANS_PER_TRACE = 50
  TRACES_PER_REQUEST = 10

  module_function

  def trace(n)
    root_id = ((n + 1) * 1_000) + 1
    Array.new(SPANS_PER_TRACE) do |i|
      {
        trace_id: (n + 1) * 1_000_003,
        span_id: ((n + 1) * 1_000) + i + 1,
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

  def traces(count) = Array.new(count) { |n| trace(n) }
end
