# frozen_string_literal: true

# Real forks with transports and writers in flight.
RSpec.describe "fork safety" do # rubocop:disable RSpec/DescribeClass
  let(:agent) { TestAgent.shared.clear }

  after { expect(agent.check_failures).to be_nil }

  def trace_ids = agent.traces.map { |t| t.first["trace_id"] }.sort

  it "before_fork leaves no runtime thread alive; the runtime restarts after" do
    t = Exporter::Transport.new(url: agent.url)
    w = Exporter::Writer.new(transport: t)
    expect(t.send_traces([SpanFactory.trace(1)])).to be_ok
    expect(Exporter::Runtime.thread_count).to be >= 1
    Exporter::Native.before_fork
    # Joined threads may still be listed in /proc for an instant while the
    # kernel releases them (they run no code of ours by then).
    expect(eventually(timeout: 1) { Exporter::Runtime.thread_count.zero? }).to be(true)
    Exporter::Native.after_fork_parent
    expect(w.write(SpanFactory.trace(2))).to be(true)
    expect(w.flush(timeout: 5)).to be(true)
    expect(Exporter::Runtime.thread_count).to be >= 1
    w.stop
    expect(trace_ids).to eq([1, 2])
  end

  it "parent and child both send after a fork" do
    t = Exporter::Transport.new(url: agent.url)
    expect(t.send_traces([SpanFactory.trace(1)])).to be_ok
    status = fork_and_wait { raise "child send failed" unless t.send_traces([SpanFactory.trace(2)]).ok? }
    expect(status).to be_success
    expect(t.send_traces([SpanFactory.trace(3)])).to be_ok
    expect(trace_ids).to eq([1, 2, 3])
    t.close
  end

  it "a fork during an in-flight send waits for it; both sides send afterwards" do
    server = ScriptedServer.new { [:sleep, 0.5, [200, {}, "{}"]] }
    t = Exporter::Transport.new(url: server.url, timeout: 5)
    sender = Thread.new { t.send_traces([SpanFactory.trace(1)]) }
    eventually { server.received.size == 1 }
    t0 = monotonic
    status = fork_and_wait { raise "child send failed" unless t.send_traces([SpanFactory.trace(2)]).ok? }
    expect(sender.value).to be_ok
    expect(status).to be_success
    # fork waited for the send's answer (0.5 s after the request arrived).
    expect(monotonic - t0).to be > 0.3
    expect(t.send_traces([SpanFactory.trace(3)])).to be_ok
    expect(server.received.size).to eq(3)
  ensure
    t&.close
    server&.close
  end

  it "a :before hook raising restores the parent, including transport locks" do
    raising = Exporter::AtFork.at_fork(:before) { raise "not now" }
    t = Exporter::Transport.new(url: agent.url) # its :before runs first, then raising's
    expect { fork { exit!(0) } }.to raise_error(RuntimeError, "not now")
    Exporter::AtFork.remove_at_fork(:before, raising)
    expect(Timeout.timeout(5) { t.send_traces([SpanFactory.trace(1)]) }).to be_ok
    expect(fork_and_wait { exit!(t.send_traces([SpanFactory.trace(2)]).ok? ? 0 : 1) }).to be_success
    expect(trace_ids).to eq([1, 2])
    t.close
  end

  it "a child never resends what the parent queued; the parent still sends it" do
    t = Exporter::Transport.new(url: agent.url)
    w = Exporter::Writer.new(transport: t, flush_interval: 60)
    5.times { |i| w.write(SpanFactory.trace(i + 1)) }
    status = fork_and_wait do
      raise "child inherited queue: #{w.stats}" unless w.stats[:queued].zero?

      w.write(SpanFactory.trace(100))
      raise "child flush failed: #{w.stats}" unless w.flush(timeout: 5)
    end
    expect(status).to be_success
    expect(w.flush(timeout: 5)).to be(true)
    expect(w.stats).to include(written: 5, sent: 5, dropped: 0, failed: 0, queued: 0)
    eventually_via_sidecar { trace_ids.size >= 6 }
    expect(trace_ids).to eq([1, 2, 3, 4, 5, 100])
    w.stop
  end

  it "100 sequential forks while two threads write: every child sends and exits 0, nothing is lost", timeout: 180 do
    t = Exporter::Transport.new(url: agent.url)
    w = Exporter::Writer.new(transport: t, flush_interval: 0.05, buffer_size: 100_000)
    stop = false
    writers = 2.times.map do |k|
      Thread.new do
        n = 0
        until stop
          n += 1
          w.write([SpanFactory.span(trace_id: (k + 1) * 1_000_000 + n, span_id: n)])
          sleep 0.001
        end
        n
      end
    end
    children = (1..100).map do |i|
      fork_and_wait(timeout: 20) do
        w.write([SpanFactory.span(trace_id: 5_000_000 + i, span_id: 1)])
        raise "child #{i} flush failed: #{w.stats}" unless w.flush(timeout: 10)
      end
    end
    stop = true
    written = writers.sum(&:value)
    expect(children).to all(be_success)
    expect(w.flush(timeout: 20)).to be(true)
    expect(w.stats).to include(written: written, sent: written, dropped: 0, failed: 0)
    ids = eventually(timeout: 20) do
      got = trace_ids
      got if got.size >= written + 100
    end
    expect(ids.size).to eq(written + 100)
    expect(ids.uniq.size).to eq(ids.size)
    w.stop
  end

  it "close racing a send neither hangs nor raises" do
    server = ScriptedServer.new { [:sleep, 0.2, [200, {}, "{}"]] }
    hooks_before = Exporter::AtFork.hooks(:before).size
    t = Exporter::Transport.new(url: server.url)
    results = 4.times.map { Thread.new { t.send_traces([SpanFactory.trace(1)]) } }
    eventually { server.received.any? }
    t.close
    responses = results.map { |th| th.join(5) && th.value }
    expect(responses).to all(be_a(Exporter::Response))
    expect(responses.map(&:error).compact).to all(eq("transport is closed"))
    expect(t.send_traces([SpanFactory.trace(2)]).error).to eq("transport is closed")
    # Closed transports take no part in forks any more.
    expect(Exporter::AtFork.hooks(:before).size).to eq(hooks_before)
  ensure
    server&.close
  end

  it "Thread#kill mid-send still propagates after forks" do
    server = ScriptedServer.new { :hang }
    t = Exporter::Transport.new(url: server.url, timeout: 30, deadline: 60)
    expect(fork_and_wait { nil }).to be_success
    th = Thread.new { t.send_traces([SpanFactory.trace(1)]) }
    eventually { server.received.any? }
    t0 = monotonic
    th.kill
    expect(th.join(1)).to eq(th)
    expect(monotonic - t0).to be < 1
  ensure
    t&.close
    server&.close
  end

  # Builds transports and drops them, in a frame of its own so no stack
  # slot keeps them alive.
  def drop_transports(n)
    n.times { Exporter::Transport.new(url: agent.url).send_traces([SpanFactory.trace(1)]) }
    nil
  end

  it "transports dropped without close are collected and their hooks go" do
    before = Exporter::AtFork.hooks(:before).size
    drop_transports(5)
    expect(Exporter::AtFork.hooks(:before).size).to eq(before + 5)
    # A conservative GC may keep one alive through a stale stack slot; the
    # hooks capture no transport, so the rest must go.
    eventually(timeout: 10) do
      GC.start(full_mark: true, immediate_sweep: true)
      Exporter::AtFork.hooks(:before).size <= before + 1
    end
  end

  it "a transport freed in a child never touches the parent's runtime" do
    t = Exporter::Transport.new(url: agent.url)
    expect(t.send_traces([SpanFactory.trace(1)])).to be_ok # pooled connection
    status = fork_and_wait(timeout: 10) do
      t = nil
      GC.start(full_mark: true, immediate_sweep: true)
    end
    expect(status).to be_success
    expect(t.send_traces([SpanFactory.trace(2)])).to be_ok
    t.close
  end

  it "flushes at exit in a short-lived process" do
    script = <<~RUBY
      require "exporter"
      t = Exporter::Transport.new(url: #{agent.url.inspect})
      w = Exporter::Writer.new(transport: t, flush_interval: 60)
      3.times { |i| w.write([{ trace_id: 700 + i, span_id: 1, name: "short" }]) }
    RUBY
    pid = Process.spawn(ruby_bin, "-I", lib_dir, "-e", script)
    expect(wait_bounded(pid, timeout: 20)).to be_success
    expect(trace_ids).to eq([700, 701, 702])
  end
end
