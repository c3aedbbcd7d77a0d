# frozen_string_literal: true

# Realistic spans for specs and the demo.
module SpanFactory
  module_function

  def span(trace_id:, span_id:, parent_id: 0, name: "rack.request", **extra)
    {
      trace_id: trace_id, span_id: span_id, parent_id: parent_id, name: name,
      service: "shop", resource: "GET /products/:id", type: "web",
      start: 1_700_000_000_000_000_000 + span_id, duration: 1_234_567, error: 0,
      meta: { "http.method" => "GET", "http.url" => "/products/42", "component" => "rack" },
      metrics: { "_sampling_priority_v1" => 1, "http.status_code" => 200.0 }
    }.merge(extra)
  end

  # A trace of `size` spans: a root and its children.
  def trace(trace_id, size: 3)
    root = span(trace_id: trace_id, span_id: (trace_id * 100) + 1)
    children = (2..size).map do |i|
      span(trace_id: trace_id, span_id: (trace_id * 100) + i, parent_id: root[:span_id], name: "db.query",
           resource: "SELECT * FROM products WHERE id = ?", type: "sql")
    end
    [root, *children]
  end
end
