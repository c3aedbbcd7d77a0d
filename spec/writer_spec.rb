# frozen_string_literal: true

RSpec.describe Exporter::Writer do
  let(:agent) { TestAgent.shared.clear }
  let(:transport) { Exporter::Transport.new(url: agent.url) }

  after { expect(agent.check_failures).to be_nil }

  def trace_ids = agent.traces.map { |t| t.first["trace_id"] }.sort

  it "writes, flushes and counts" do
    w = described_class.new(transport: transport, flush_interval: 10)
    expect(w.write(SpanFactory.trace(1))).to be(true)
    expect(w.write(SpanFactory.trace(2))).to be(true)
    expect(w.stats).to include(written: 2, queued: 2, sent: 0)
    expect(w.flush(timeout: 5)).to be(true)
    expect(w.stats).to include(written: 2, sent: 2, dropped: 0, failed: 0, queued: 0, requests: 1)
    expect(trace_ids).to eq([1, 2])
    w.stop
  end

  it "flushes on its own every flush_interval" do
    w = described_class.new(transport: transport, flush_interval: 0.1)
    w.write(SpanFactory.trace(7))
    eventually(timeout: 5) { w.stats[:sent] == 1 }
    expect(trace_ids).to eq([7])
    w.stop
  end

  it "drops new traces when the buffer is full, counts them, and loses nothing else" do
    require "msgpack"
    slow = ScriptedServer.new { [:sleep, 0.3, [200, {}, "{}"]] }
    w = described_class.new(transport: Exporter::Transport.new(url: slow.url), buffer_size: 3, flush_interval: 60)
    results = (1..10).map { |i| w.write(SpanFactory.trace(i)) }
    dropped = results.count(false)
    expect(dropped).to be >= 4 # at most 3 queued + one batch (of at most 3) in flight
    expect(w.flush(timeout: 10)).to be(false) # some of what was written was dropped
    expect(w.stats).to include(written: 10, sent: 10 - dropped, dropped: dropped, failed: 0, queued: 0)
    received = slow.received.flat_map { |r| MessagePack.unpack(r.body) }.map { |t| t.first["trace_id"] }
    expect(received.sort).to eq((1..10).select.with_index { |_, i| results[i] })
    w.write(SpanFactory.trace(11))
    expect(w.flush(timeout: 10)).to be(true) # nothing lost since the last flush
    w.stop
  ensure
    slow&.close
  end

  it "keeps traces while the agent is down, retrying and logging once" do
    dead = Exporter::Transport.new(url: "http://127.0.0.1:#{TestAgent.free_port}", timeout: 0.1, deadline: 0.2)
    w = described_class.new(transport: dead, flush_interval: 60)
    r, wr = IO.pipe
    old_stderr = $stderr.dup
    $stderr.reopen(wr)
    begin
      3.times do |i|
        w.write(SpanFactory.trace(i + 1))
        expect(w.flush(timeout: 0.3)).to be(false)
      end
      eventually { w.stats[:retries] >= 3 }
    ensure
      $stderr.reopen(old_stderr)
      wr.close
    end
    log = r.read
    expect(log.lines.grep(/exporter: trace writer/).size).to eq(1)
    expect(w.stats).to include(written: 3, failed: 0, dropped: 0, sent: 0, queued: 3)
    expect(w.stats[:last_error]).to include("connect failed")
    w.stop(timeout: 0.1)
  end

  it "raises InvalidTraceError on bad input and queues nothing" do
    w = described_class.new(transport: transport)
    expect { w.write([{ span_id: 1, name: "x" }]) }.to raise_error(Exporter::InvalidTraceError, /trace_id is missing/)
    expect(w.stats).to include(written: 0, queued: 0)
    w.stop
  end

  it "stop flushes, closes the transport and drops later writes" do
    w = described_class.new(transport: transport, flush_interval: 60)
    w.write(SpanFactory.trace(1))
    expect(w.stop(timeout: 5)).to be(true)
    expect(w.stop).to be(true)
    expect(transport).to be_closed
    expect(w.write(SpanFactory.trace(2))).to be(false)
    expect(trace_ids).to eq([1])
  end

  it "rejects bad arguments" do
    expect { described_class.new(transport: "x") }.to raise_error(ArgumentError, /transport/)
    expect { described_class.new(transport: transport, buffer_size: 0) }.to raise_error(ArgumentError, /buffer_size/)
    expect { described_class.new(transport: transport, flush_interval: -1) }.to raise_error(ArgumentError, /flush_interval/)
  end
end

RSpec.describe Exporter::SyncWriter do
  let(:agent) { TestAgent.shared.clear }

  it "sends each trace inline and counts" do
    w = described_class.new(transport: Exporter::Transport.new(url: agent.url))
    expect(w.write(SpanFactory.trace(1))).to be(true)
    expect(agent.traces.size).to eq(1)
    expect(w.stats).to eq(written: 1, sent: 1, dropped: 0, failed: 0)
    w.stop
    expect(w.write(SpanFactory.trace(2))).to be(false)
    expect(w.stats).to include(written: 2, failed: 1)
  end
end
