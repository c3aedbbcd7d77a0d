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
    "zero span_id" => [-> { [[good, good(span_id: 0)]] }, /trace 0, span 1: span_id must not be 0/],
    "zero trace_id" => [-> { [[good(trace_id: 0)]] }, /trace 0, span 0: trace_id must not be 0/],
    "trace_id with zero low 64 bits" => [-> { [[good(trace_id: 5 << 64)]] }, /trace_id must not have its low 64 bits all 0/],
    "negative Bignum span_id" => [-> { [[good(span_id: -(2**70))]] }, /span_id is out of range for an unsigned 64-bit id/],
    "negative Bignum trace_id" => [-> { [[good(trace_id: -(2**100))]] }, /trace_id is out of range for an unsigned 128-bit id/],
    "negative Fixnum trace_id" => [-> { [[good(trace_id: -1)]] }, /trace_id is out of range/],
    "Bignum parent_id over 64 bits" => [-> { [[good(parent_id: 2**64 + 5)]] }, /parent_id is out of range/],
    "huge Bignum span_id" => [-> { [[good(span_id: 7**5000)]] }, /span_id is out of range/],
    "Float span_id" => [-> { [[good(span_id: 1.0)]] }, /span_id must be an Integer \(got Float\)/],
    "nil trace_id" => [-> { [[good(trace_id: nil)]] }, /trace_id must be an Integer \(got NilClass\)/],
    "Rational parent_id" => [-> { [[good(parent_id: Rational(1, 2))]] }, /parent_id must be an Integer \(got Rational\)/],
    # A trace id object shared by the spans is read once per trace: a bad
    # one must still be caught on whichever span carries it.
    "bad trace_id after a good shared one" => [lambda {
      tid = 2**100 + 1
      [[good(trace_id: tid), good(trace_id: tid), good(trace_id: -tid)]]
    }, /trace 0, span 2: trace_id is out of range/],
    "link trace id over 128 bits" => [-> { [[good(span_links: [{ trace_id: 2**128, span_id: 1 }])]] },
                                      /span_links \[0\] trace_id is out of range/],
    "link span id negative" => [-> { [[good(span_links: [{ trace_id: 1, span_id: -(2**64) }])]] },
                                /span_links \[0\] span_id is out of range/],
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

  it "accepts ids at the edges of their ranges, Fixnum or Bignum, and sends them exactly" do
    tid = (2**128) - 1
    spans = [
      good(trace_id: tid, span_id: (2**64) - 1, parent_id: 0),
      good(trace_id: tid, span_id: 2**62, parent_id: (2**64) - 1),
      good(trace_id: tid, span_id: (2**62) - 1, parent_id: 2**62),
      good(trace_id: (2**64) + 1, span_id: 1),
      good(trace_id: (2**64) - 1, span_id: 2)
    ]
    expect(transport.send_traces([spans[0..2], [spans[3]], [spans[4]]])).to be_ok
    got = agent.traces.flatten.to_h { |s| [s["span_id"], s] }
    expect(got.keys).to contain_exactly((2**64) - 1, 2**62, (2**62) - 1, 1, 2)
    expect(got[(2**64) - 1]).to include("trace_id" => (2**64) - 1, "parent_id" => 0)
    expect(got[(2**64) - 1]["meta"]["_dd.p.tid"]).to eq("ffffffffffffffff")
    expect(got[2**62]["parent_id"]).to eq((2**64) - 1)
    expect(got[(2**62) - 1]["parent_id"]).to eq(2**62)
    expect(got[1]).to include("trace_id" => 1)
    expect(got[1]["meta"]["_dd.p.tid"]).to eq("0000000000000001")
    expect(got[2]).to include("trace_id" => (2**64) - 1)
    expect(got[2]["meta"]).not_to have_key("_dd.p.tid")
  end

  it "reads random Bignum ids exactly (from the object itself on this Ruby)" do
    expect(Exporter::Native.bignum_reading).to eq(:direct)
    rng = Random.new(0xB16)
    spans = Array.new(200) do |i|
      tid = [rng.rand(2**62...2**64), rng.rand(2**64...2**128), (2**64) | rng.rand(2**64)][i % 3]
      good(trace_id: tid, span_id: rng.rand(2**62...2**64), parent_id: rng.rand(2**62...2**64))
    end
    expect(transport.send_traces(spans.map { |s| [s] })).to be_ok
    got = agent.traces.flatten.to_h { |s| [s["span_id"], s] }
    spans.each do |s|
      g = got.fetch(s[:span_id])
      expect(g).to include("trace_id" => s[:trace_id] & ((2**64) - 1), "parent_id" => s[:parent_id])
      high = s[:trace_id] >> 64
      expect(g["meta"]["_dd.p.tid"]).to eq(high.zero? ? nil : format("%016x", high))
    end
  end

  it "is an ArgumentError" do
    expect(described_class.ancestors).to include(ArgumentError)
  end
end
