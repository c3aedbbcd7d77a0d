# frozen_string_literal: true

require "msgpack"

# Transport behaviour against a scripted server: retries, timeouts,
# interrupts, signals, the GVL.
RSpec.describe Exporter::Transport do
  OK_BODY = '{"rate_by_service":{"service:shop,env:":0.25}}'

  let(:traces) { [SpanFactory.trace(1, size: 2), SpanFactory.trace(2, size: 1)] }

  def server(&script)
    @server = ScriptedServer.new(&script)
  end

  after { @server&.close }

  def transport(**opts)
    @transport = described_class.new(url: @server.url, **opts)
  end

  after { @transport&.close }

  it "retries 429 after the Retry-After it was given" do
    server { |n| n.zero? ? [429, { "Retry-After" => "1" }] : [200, {}, OK_BODY] }
    r = transport(timeout: 2).send_traces(traces)
    expect(r).to be_ok
    expect(r.requests).to eq(2)
    expect(r.rate_by_service).to eq("service:shop,env:" => 0.25)
    first, second = @server.received
    expect(second.at - first.at).to be >= 0.95
  end

  it "retries 500 then succeeds, sending the same body" do
    server { |n| n.zero? ? [500, {}, "oops"] : [200, {}, OK_BODY] }
    r = transport.send_traces(traces)
    expect(r).to be_ok
    expect(r.status).to eq(200)
    expect(r.requests).to eq(2)
    a, b = @server.received
    expect(a.body).to eq(b.body)
    expect(MessagePack.unpack(a.body).size).to eq(2)
    expect(a.headers["x-datadog-trace-count"]).to eq("2")
  end

  [400, 413].each do |status|
    it "does not retry #{status}" do
      server { [status, {}, "no"] }
      r = transport.send_traces(traces)
      expect(r).not_to be_ok
      expect(r.status).to eq(status)
      expect(r.requests).to eq(1)
      expect(r.failed_count).to eq(2)
      expect(r.error).to include("answered #{status}")
      expect(@server.received.size).to eq(1)
    end
  end

  it "gives up at the deadline on a server that never answers" do
    server { :hang }
    t0 = monotonic
    r = transport(timeout: 0.3, deadline: 0.8).send_traces(traces)
    # Two attempts time out; a retry that could not finish in time is not made.
    expect(monotonic - t0).to be_between(0.6, 1.1)
    expect(r.requests).to be >= 2
    expect(r).not_to be_ok
    expect(r.error).to match(/timed out|deadline/)
    # Timed out once sent: the agent may have them, so not "failed".
    expect(r.timed_out_count).to eq(2)
    expect(r.failed_count).to eq(0)
  end

  it "reports a refused connection without raising" do
    port = TestAgent.free_port
    @transport = described_class.new(url: "http://127.0.0.1:#{port}", timeout: 0.2, deadline: 0.5)
    r = @transport.send_traces(traces)
    expect(r).not_to be_ok
    expect(r.status).to be_nil
    expect(r.error).to include("connect")
  end

  it "splits under max_payload_size and drops a single oversized trace" do
    server { [200, {}, OK_BODY] }
    big = [SpanFactory.span(trace_id: 50, span_id: 1, resource: "x" * 20_000)]
    many = (1..20).map { |i| SpanFactory.trace(i, size: 3) }
    r = transport(max_payload_size: 8_000).send_traces(many + [big])
    expect(r.dropped_count).to eq(1)
    expect(r.trace_count).to eq(20)
    expect(r).not_to be_ok
    bodies = @server.received.map(&:body)
    expect(bodies.size).to be > 1
    expect(bodies.map(&:bytesize).max).to be <= 8_000
    expect(bodies.sum { |b| MessagePack.unpack(b).size }).to eq(20)
  end

  describe "interrupts" do
    def start_stalled_send
      server { :hang }
      t = transport(timeout: 30, deadline: 60)
      outcome = Queue.new
      thread = Thread.new do
        t.send_traces(traces)
        outcome << :returned
      rescue Exception => e # rubocop:disable Lint/RescueException
        outcome << e
        raise
      end
      thread.report_on_exception = false
      eventually { @server.received.any? }
      [thread, outcome]
    end

    it "Thread#kill ends a stalled send within 1s" do
      thread, = start_stalled_send
      t0 = monotonic
      thread.kill
      expect(thread.join(1)).to eq(thread)
      expect(monotonic - t0).to be < 1
      expect(thread.status).to be(false)
    end

    it "Thread#raise ends a stalled send within 1s and the exception reaches Ruby" do
      thread, outcome = start_stalled_send
      t0 = monotonic
      thread.raise(RuntimeError, "stop it")
      expect { thread.join(1) }.to raise_error(RuntimeError, "stop it")
      expect(monotonic - t0).to be < 1
      expect(outcome.pop.message).to eq("stop it")
    end

    it "Timeout.timeout ends a stalled send within 1s" do
      server { :hang }
      t = transport(timeout: 30, deadline: 60)
      t0 = monotonic
      expect { Timeout.timeout(0.3) { t.send_traces(traces) } }.to raise_error(Timeout::Error)
      expect(monotonic - t0).to be < 1.3
    end

    it "a trapped signal during a slow send neither drops nor fails it" do
      server { [:sleep, 0.5, [200, {}, OK_BODY]] }
      t = transport(timeout: 5)
      trapped = 0
      old = Signal.trap("USR1") { trapped += 1 }
      begin
        killer = Thread.new do
          eventually { @server.received.any? }
          # One signal at a time (pending signals coalesce): the next is
          # sent once the handler has run for the previous one.
          3.times do |i|
            Process.kill("USR1", Process.pid)
            eventually { trapped > i }
          end
        end
        r = t.send_traces(traces)
        killer.join(5)
        expect(trapped).to eq(3)
        expect(r).to be_ok
        expect(r.requests).to eq(1)
        expect(@server.received.size).to eq(1)
      ensure
        Signal.trap("USR1", old)
      end
    end
  end

  it "releases the GVL: another Ruby thread runs while a send waits" do
    server { [:sleep, 0.5, [200, {}, OK_BODY]] }
    t = transport(timeout: 5)
    counter = 0
    spinner = Thread.new { loop { counter += 1 } }
    eventually { counter.positive? }
    before = counter
    r = t.send_traces(traces)
    progressed = counter - before
    spinner.kill
    spinner.join(1)
    expect(r).to be_ok
    # Held GVL: the spinner would be frozen for the whole 0.5 s wait.
    expect(progressed).to be > 1_000_000
  end

  it "after close, sends fail without raising and close is idempotent" do
    server { [200, {}, OK_BODY] }
    t = transport
    expect(t.send_traces(traces)).to be_ok
    t.close
    t.close
    expect(t).to be_closed
    r = t.send_traces(traces)
    expect(r).not_to be_ok
    expect(r.error).to eq("transport is closed")
    expect(@server.received.size).to eq(1)
  end

  it "returns an ok empty response for no traces, without a request" do
    server { [200, {}, OK_BODY] }
    r = transport.send_traces([])
    expect(r).to be_ok
    expect(r.requests).to eq(0)
  end

  describe "configuration" do
    around do |ex|
      saved = ENV.to_h
      ex.run
    ensure
      ENV.replace(saved)
    end

    it "reads DD_* defaults" do
      ENV["DD_TRACE_AGENT_URL"] = nil
      ENV["DD_AGENT_HOST"] = "10.1.2.3"
      ENV["DD_TRACE_AGENT_PORT"] = "9999"
      expect(described_class.new.url).to eq("http://10.1.2.3:9999")
      ENV["DD_TRACE_AGENT_URL"] = "unix:///tmp/x.sock"
      expect(described_class.new.url).to eq("unix:///tmp/x.sock")
      ENV["DD_TRACE_AGENT_TIMEOUT_SECONDS"] = "abc"
      expect { described_class.new }.to raise_error(ArgumentError, /DD_TRACE_AGENT_TIMEOUT_SECONDS/)
    end

    it "rejects bad arguments clearly" do
      expect { described_class.new(url: "https://x") }.to raise_error(ArgumentError, /scheme/)
      expect { described_class.new(url: "unix://rel") }.to raise_error(ArgumentError, /absolute/)
      expect { described_class.new(protocol: :v07) }.to raise_error(ArgumentError, /protocol/)
      expect { described_class.new(timeout: 0) }.to raise_error(ArgumentError, /timeout/)
      expect { described_class.new(timeout: "x") }.to raise_error(ArgumentError, /timeout/)
      expect { described_class.new(max_payload_size: 0) }.to raise_error(ArgumentError, /max_payload_size/)
      expect { described_class.new(service: :web) }.to raise_error(ArgumentError, /service/)
    end
  end
end
