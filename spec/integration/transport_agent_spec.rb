# frozen_string_literal: true

# What the real agent decoded equals what was sent, field by field.
RSpec.describe Exporter::Transport, "against ddapm-test-agent" do
  let(:agent) { TestAgent.shared.clear }

  after { expect(agent.check_failures).to be_nil }

  def expect_received(sent_traces)
    got = agent.traces.flatten.to_h { |s| [s["span_id"], s] }
    sent = sent_traces.flatten
    expect(got.size).to eq(sent.size)
    sent.each do |s|
      g = got.fetch(s[:span_id])
      expect(g["trace_id"]).to eq(s[:trace_id] & 0xFFFF_FFFF_FFFF_FFFF)
      expect(g["parent_id"]).to eq(s[:parent_id])
      %i[name service resource type start duration error].each do |f|
        expect(g[f.to_s]).to eq(s[f]), "#{f}: #{g[f.to_s].inspect} != #{s[f].inspect}"
      end
      s[:meta].each { |k, v| expect(g["meta"][k]).to eq(v) }
      s[:metrics].each { |k, v| expect(g["metrics"][k]).to eq(v) }
    end
    got
  end

  %i[v04 v05].each do |protocol|
    %i[tcp unix].each do |via|
      it "delivers every field (#{protocol} over #{via})" do
        url = via == :tcp ? agent.url : agent.unix_url
        t = described_class.new(url: url, protocol: protocol)
        traces = [SpanFactory.trace(1, size: 3), SpanFactory.trace(2, size: 2)]
        r = t.send_traces(traces)
        expect(r).to be_ok, r.inspect
        expect(r.status).to eq(200)
        expect(r.trace_count).to eq(2)
        expect(r.rate_by_service).to eq("service:shop,env:" => 0.5)
        expect_received(traces)
      ensure
        t&.close
      end
    end
  end

  it "sends the protocol headers" do
    t = described_class.new(url: agent.url)
    t.send_traces([SpanFactory.trace(3, size: 1), SpanFactory.trace(4, size: 1)])
    req = agent.requests.find { |q| q["url"].to_s.include?("/v0.4/traces") } || agent.requests.last
    h = req["headers"].transform_keys(&:downcase)
    expect(h).to include(
      "content-type" => "application/msgpack",
      "datadog-meta-lang" => "ruby",
      "datadog-meta-lang-version" => RUBY_VERSION,
      "datadog-meta-lang-interpreter" => RUBY_ENGINE,
      "datadog-meta-tracer-version" => Exporter::VERSION,
      "x-datadog-trace-count" => "2",
      "datadog-send-real-http-status" => "1"
    )
  ensure
    t&.close
  end

  it "sends 128-bit trace ids as low bits plus _dd.p.tid on the first span" do
    t = described_class.new(url: agent.url)
    high = 0x6543_2100_0000_00ff
    tid = (high << 64) | 77
    trace = [SpanFactory.span(trace_id: tid, span_id: 1), SpanFactory.span(trace_id: tid, span_id: 2, parent_id: 1)]
    expect(t.send_traces([trace])).to be_ok
    got = expect_received([trace])
    expect(got[1]["meta"]["_dd.p.tid"]).to eq(format("%016x", high))
    expect(got[2]["meta"]).not_to have_key("_dd.p.tid")
  ensure
    t&.close
  end

  it "sends meta_struct, span_links and span_events (v0.4)" do
    t = described_class.new(url: agent.url)
    span = SpanFactory.span(
      trace_id: 9, span_id: 91,
      meta_struct: { "appsec" => { "triggers" => [{ "rule" => "crs-942-100" }], "score" => 1.5 } },
      span_links: [{ trace_id: (5 << 64) | 6, span_id: 7, attributes: { "link.kind" => "follows" },
                     tracestate: "dd=s:1", flags: 1 }],
      span_events: [{ name: "exception", time_unix_nano: 1_700_000_000_000_000_123,
                      attributes: { "message" => "boom", "count" => 2, "ok" => false, "tags" => %w[a b] } }]
    )
    expect(t.send_traces([[span]])).to be_ok
    got = agent.spans.first
    expect(got["meta_struct"]).to eq("appsec" => { "triggers" => [{ "rule" => "crs-942-100" }], "score" => 1.5 })
    link = got["span_links"].first
    expect(link).to include("trace_id" => 6, "trace_id_high" => 5, "span_id" => 7,
                            "attributes" => { "link.kind" => "follows" }, "tracestate" => "dd=s:1", "flags" => 1)
    event = got["span_events"].first
    expect(event["name"]).to eq("exception")
    expect(event["time_unix_nano"]).to eq(1_700_000_000_000_000_123)
    expect(event["attributes"]["message"]).to eq("type" => 0, "string_value" => "boom")
    expect(event["attributes"]["count"]).to eq("type" => 2, "int_value" => 2)
    expect(event["attributes"]["ok"]).to eq("type" => 1, "bool_value" => false)
  ensure
    t&.close
  end

  it "sends binary strings holding UTF-8 as text and scrubs invalid UTF-8" do
    t = described_class.new(url: agent.url)
    span = SpanFactory.span(trace_id: 10, span_id: 101,
                            resource: "GET /caf\u00e9".b,
                            meta: { "bad" => "ab\xFFcd".b, "latin1" => "caf\xE9".dup.force_encoding("ISO-8859-1") })
    expect(t.send_traces([[span]])).to be_ok
    got = agent.spans.first
    expect(got["resource"]).to eq("GET /caf\u00e9")
    expect(got["meta"]["bad"]).to eq("ab\uFFFDcd")
    expect(got["meta"]["latin1"]).to eq("caf\u00e9")
  ensure
    t&.close
  end

  it "copies frozen strings shared by spans once, and every other string as it is" do
    t = described_class.new(url: agent.url)
    latin1 = "caf\xE9".dup.force_encoding("ISO-8859-1").freeze
    shared = "shared-value"
    spans = Array.new(40) do |i|
      own = "value-#{i}".freeze # 40 distinct frozen strings: more than the cache's slots
      meta = { "shared" => shared, "own" => own, own => "key-#{i}", "mutable" => +"m-#{i}" }
      meta["latin1"] = latin1 if i.odd? # transcoded: a Ruby object is allocated
      SpanFactory.span(trace_id: 13, span_id: 131 + i, parent_id: i.zero? ? 0 : 131, meta: meta)
    end
    expect(t.send_traces([spans])).to be_ok
    got = agent.spans.to_h { |s| [s["span_id"], s["meta"]] }
    spans.each_with_index do |s, i|
      m = got.fetch(s[:span_id])
      expect(m).to include("shared" => "shared-value", "own" => "value-#{i}", "value-#{i}" => "key-#{i}",
                           "mutable" => "m-#{i}")
      expect(m["latin1"]).to eq(i.odd? ? "caf\u00e9" : nil)
    end
  ensure
    t&.close
  end

  it "reads Hashes of every shape (small, large, with deleted entries, by identity) while a GC may run between entries" do
    t = described_class.new(url: agent.url)
    latin1 = "caf\xE9".dup.force_encoding("ISO-8859-1")
    metas = [
      {},
      { "gone" => "x" }.tap { |h| h.delete("gone") },
      { "a" => "1", "gone" => "x", "b" => latin1 }.tap { |h| h.delete("gone") },
      (1..12).to_h { |j| ["k#{j}", "v#{j}"] }.tap { |h| h.delete("k1") && h.delete("k7") && h["k13"] = latin1 },
      { "a" => "1" }.compare_by_identity.tap { |h| h["b"] = latin1 }
    ]
    spans = metas.each_with_index.map do |meta, i|
      span = SpanFactory.span(trace_id: 14, span_id: 141 + i, meta: meta, extra1: 1, extra2: 2)
      span.delete(:extra1)
      span.delete(:trace_id)
      span[:trace_id] = 14 # now the last entry, after deleted ones
      span
    end
    w = Exporter::Writer.new(transport: t, flush_interval: 3600)
    begin
      GC.stress = true # conversion only (Writer#write queues; it never waits)
      written = w.write(spans)
    ensure
      GC.stress = false
    end
    expect(written).to be(true)
    expect(w.flush(timeout: 10)).to be(true)
    w.stop
    got = agent.spans.to_h { |s| [s["span_id"], s] }
    expect(got.keys).to contain_exactly(141, 142, 143, 144, 145)
    metas.each_with_index do |meta, i|
      g = got.fetch(141 + i)
      expect(g["trace_id"]).to eq(14)
      expect((g["meta"] || {}).except("env", "version")).to eq(meta.to_h { |k, v| [k, v.encode("UTF-8")] })
    end
  ensure
    t&.close
  end

  it "iterates Hashes directly on this Ruby (no rb_ensure frame per Hash; on 3.1 and 3.2 no C call per entry)" do
    expect(Exporter::Native.hash_iteration).to eq(RUBY_VERSION < "3.3" ? :table : :direct)
  end

  it "fills service, env and version from the transport" do
    t = described_class.new(url: agent.url, service: "billing", env: "staging", version: "2.1")
    span = SpanFactory.span(trace_id: 11, span_id: 111).merge(service: nil, meta: {})
    expect(t.send_traces([[span]])).to be_ok
    got = agent.spans.first
    expect(got["service"]).to eq("billing")
    expect(got["meta"]).to include("env" => "staging", "version" => "2.1")
  ensure
    t&.close
  end

  it "accepts String keys as well as Symbol keys" do
    t = described_class.new(url: agent.url)
    span = SpanFactory.span(trace_id: 12, span_id: 121).transform_keys(&:to_s)
    expect(t.send_traces([[span]])).to be_ok
    expect(agent.spans.first["name"]).to eq("rack.request")
  ensure
    t&.close
  end
end
