# frozen_string_literal: true

# Every bad input raises InvalidTraceError naming trace, span and field, and
# the agent receives nothing.
RSpec.describe Exporter::InvalidTraceError do
  let(:agent) { TestAgent.shared.clear }
  let(:transport) { Exporter::Transport.new(url: agent.url) }

  after { transport.close }

  def good(**over) = SpanFactory.span(trace_id: 1, span_id: 1).merge(over)

  def without(key) = good.tap { |s| s.delete(key) }

  CASES = {
    "missing name" => [-> { [[good], [without(:name)]] }, /trace 1, span 0: name is missing/],
    "missing trace_id" => [-> { [[without(:trace_id)]] }, /trace 0, span 0: trace_id is missing/],
    "missing span_id" => [-> { [[good, without(:span_id)]] }, /trace 0, span 1: span_id is missing/],
    "String id" => [-> { [[good(span_id: "12")]] }, /span_id must be an Integer \(got String\)/],
    "negative id" => [-> { [[good(parent_id: -1)]] }, /parent_id is out of range/],
    "id over 64 bits" => [-> { [[good(span_id: 2**64)]] }, /span_id is out of range/],
    "trace id over 128 bits" => [-> { [[good(trace_id: 2**128)]] }, /trace_id is out of range/],
    "non-String meta value" => [-> { [[good(meta: { "a" => 1 })]] }, /meta \["a"\] must be a String \(got Integer\)/],
    "non-String meta key" => [-> { [[good(meta: { 1 => "a" })]] }, /meta has a key that must be a String or Symbol/],
    "non-numeric metric" => [-> { [[good(metrics: { "m" => "1" })]] }, /metrics \["m"\] must be an Integer or Float/],
    "meta not a Hash" => [-> { [[good(meta: [])]] }, /meta must be a Hash \(got Array\)/],
    "name not a String" => [-> { [[good(name: :sym)]] }, /name must be a String \(got Symbol\)/],
    # false is VALUE 0, which also marks a free slot of the per-trace text cache.
    "false as name" => [-> { [[good(name: false)]] }, /name must be a String \(got FalseClass\)/],
    "false as meta value" => [-> { [[good, good(meta: { "a" => false })]] },
                              /trace 0, span 1: meta \["a"\] must be a String \(got FalseClass\)/],
    "false as meta key" => [-> { [[good(meta: { false => "a" })]] }, /meta has a key that must be a String or Symbol/],
    "negative duration" => [-> { [[good(duration: -5)]] }, /duration must not be negative/],
    "Float start" => [-> { [[good(start: 1.5)]] }, /start must be an Integer \(got Float\)/],
    "span not a Hash" => [-> { [[good, 42]] }, /trace 0, span 1: span must be a Hash \(got Integer\)/],
    "trace not an Array" => [-> { [[good], { a: 1 }] }, /trace 1: must be an Array of span Hashes/],
    "traces not an Array" => [-> { "nope" }, /traces must be an Array of traces/],
    "meta_struct value not a Hash" => [-> { [[good(meta_struct: { "a" => 1 })]] }, /meta_struct \["a"\] must be a Hash/],
    "span link without span_id" => [-> { [[good(span_links: [{ trace_id: 1 }])]] }, /span_links \[0\] needs trace_id and span_id/],
    "span event bad attribute" => [-> { [[good(span_events: [{ name: "e", time_unix_nano: 1, attributes: { "x" => {} } }])]] },
                                   /span_events \[0\] attributes \["x"\] must be a String, Integer/]
  }.freeze

  CASES.each do |label, (input, message)|
    it "rejects #{label}" do
      expect { transport.send_traces(instance_exec(&input)) }.to raise_error(described_class, message)
      # Conversion raises before any send is started, so nothing can be in
      # flight to wait for.
      expect(agent.requests.count { |r| r["url"].to_s.include?("/traces") }).to eq(0)
    end
  end

  it "is an ArgumentError" do
    expect(described_class.ancestors).to include(ArgumentError)
  end
end
