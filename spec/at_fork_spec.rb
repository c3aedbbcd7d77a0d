# frozen_string_literal: true

RSpec.describe Exporter::AtFork do
  around do |ex|
    @handles = []
    ex.run
  ensure
    @handles.each { |h| described_class.remove_at_fork(h.stage, h) }
  end

  # A send through a new transport reaches the agent: the runtime runs.
  def expect_sends_work
    t = Exporter::Transport.new(url: TestAgent.shared.clear.url)
    expect(t.send_traces([SpanFactory.trace(1)])).to be_ok
  ensure
    t&.close
  end

  def hook(stage, owner: nil, &blk)
    described_class.at_fork(stage, owner: owner, &blk).tap { |h| @handles << h }
  end

  # Runs `blk` in a forked child and returns what it wrote to the pipe.
  def in_child_output(&blk)
    r, w = IO.pipe
    pid = fork do
      r.close
      w.write(blk.call.to_s)
      w.close
      exit!(0)
    end
    w.close
    out = r.read
    r.close
    expect(wait_bounded(pid)).to be_success
    out
  end

  it "runs :before, then :parent in the parent and :child in the child" do
    events = []
    hook(:before) { events << :before }
    hook(:parent) { events << :parent }
    child_events = []
    hook(:child) { child_events << :child }
    out = in_child_output { child_events.inspect }
    expect(events).to eq(%i[before parent])
    expect(out).to eq("[:child]")
  end

  it "runs :before in reverse registration order, :parent/:child in order" do
    order = []
    hook(:before) { order << :b1 }
    hook(:before) { order << :b2 }
    hook(:parent) { order << :p1 }
    hook(:parent) { order << :p2 }
    expect(wait_bounded(fork { exit!(0) })).to be_success
    expect(order).to eq(%i[b2 b1 p1 p2])
  end

  it "remove_at_fork removes the hook" do
    calls = 0
    h = hook(:before) { calls += 1 }
    expect(described_class.remove_at_fork(:before, h)).to be(true)
    expect(described_class.remove_at_fork(:before, h)).to be(false)
    expect(wait_bounded(fork { exit!(0) })).to be_success
    expect(calls).to eq(0)
  end

  it "rejects unknown stages and missing blocks" do
    expect { described_class.at_fork(:after) { nil } }.to raise_error(ArgumentError, /stage/)
    expect { described_class.at_fork(:before) }.to raise_error(ArgumentError, /block/)
  end

  it "a :before hook raising stops the fork and undoes the owners whose :before began, its own too" do
    undone = []
    hook(:before, owner: :a) { nil }
    hook(:parent, owner: :a) { undone << :a }
    hook(:before, owner: :b) { raise "no fork now" } # runs first (reverse order)
    hook(:parent, owner: :b) { undone << :b }
    hook(:before, owner: :c) { nil } # registered last: ran before :b raised
    hook(:parent, owner: :c) { undone << :c }
    expect { fork { exit!(0) } }.to raise_error(RuntimeError, "no fork now")
    expect(undone).to eq(%i[b c])
  end

  # What Puma's master does: its SIGTERM trap handler raises wherever the
  # main thread is, a fork's hooks included, and no mask defers a trap.
  it "an exception raised after the fork, or by a :parent hook, still runs every :parent hook" do
    undone = []
    armed = false
    hook(:parent, owner: :a) do
      undone << :a
      raise "parent hook bug" if armed
    end
    hook(:parent, owner: :b) { undone << :b }
    pids = []
    expect do
      Exporter::AtFork.around_fork do
        pids << fork { exit!(0) } # a real fork inside: its own hooks run too
        armed = true
        raise SignalException, "TERM" # as a trap handler would, right after the fork returned
      end
    end.to raise_error(SignalException)
    expect(undone).to eq(%i[a b a b])
    pids.each { |pid| wait_bounded(pid) }
    expect_sends_work # the runtime was paused and resumed around both forks
  end

  it "a :parent hook's error is raised after a fork that went well, even from inside a rescue clause" do
    hook(:parent) { raise "parent hook bug" }
    r, w = IO.pipe
    begin
      raise "the application's own error"
    rescue RuntimeError
      expect do
        fork do
          w.puts(Process.pid)
          exit!(0)
        end
      end.to raise_error(RuntimeError, "parent hook bug")
    end
    w.close
    # The fork itself happened (the error came after it): reap its child.
    pid = Timeout.timeout(10) { r.gets }.to_i
    r.close
    expect(wait_bounded(pid)).to be_success
  end

  it "at exit, a runtime left paused by a cut-short fork is resumed and what was queued is sent" do
    agent = TestAgent.shared.clear
    pid = fork do
      w = Exporter::Writer.new(transport: Exporter::Transport.new(url: agent.url), flush_interval: 3600)
      w.write([{ trace_id: 77, span_id: 1, name: "x" }])
      Exporter::Native.before_fork # and no :parent hook: as if a trap raised in between
      exit!(3) unless Exporter::Native.fork_in_progress?
      exit(0)
    end
    expect(wait_bounded(pid).exitstatus).to eq(0)
    expect(eventually_via_sidecar { (t = agent.traces).any? && t }.map { |t| t.first["trace_id"] }).to eq([77])
  end

  it "a trap handler raising at random points of real forks never leaves the runtime paused" do
    agent = TestAgent.shared.clear
    # In a child of its own, so that children whose pid the trap cut off
    # before it was returned die with it, unreaped by rspec.
    pid = fork do
      t = Exporter::Transport.new(url: agent.url)
      w = Exporter::Writer.new(transport: t, flush_interval: 3600)
      stop = Class.new(StandardError)
      Signal.trap("USR2") { raise stop }
      interrupted = 0
      paused = 0
      200.times do |i|
        killer = Thread.new { sleep(rand * 0.003) && Process.kill(:USR2, Process.pid) }
        begin
          child = fork { exit!(0) }
          w.write([{ trace_id: i + 1, span_id: 1, name: "x" }])
          killer.join
          sleep 0.005 # a late signal lands here
          Process.wait(child)
        rescue stop
          interrupted += 1
          killer.join
        end
        # The writer's worker restarts the runtime as soon as a fork ends.
        paused += 1 unless Exporter::Runtime.running?
      end
      Signal.trap("USR2", "DEFAULT")
      ok = w.flush(timeout: 10) && t.send_traces([SpanFactory.trace(1000)]).ok?
      good = ok && interrupted.positive? && paused.zero?
      $stderr.puts "interrupted #{interrupted} of 200, left paused #{paused}, flush/send ok: #{ok.inspect}" unless good
      exit!(good ? 0 : 1)
    end
    expect(wait_bounded(pid, timeout: 60).exitstatus).to eq(0)
  end

  it "a failed fork (_fork raising EAGAIN) runs :parent and restores the parent" do
    events = []
    hook(:before) { events << :before }
    hook(:parent) { events << :parent }
    # The same patch Process gets, over a _fork that fails like fork(2) can.
    failing = Object.new
    def failing._fork = raise(Errno::EAGAIN, "simulated")
    failing.singleton_class.prepend(Exporter::AtFork::ProcessPatch)
    expect { failing._fork }.to raise_error(Errno::EAGAIN)
    expect(events).to eq(%i[before parent])
    expect_sends_work # the runtime hooks ran too: it was stopped and restarted
  end

  it "Process.daemon runs :before then :child" do
    r, w = IO.pipe
    hook(:before) { w.write("before;") }
    hook(:child) { w.write("child;") }
    pid = fork do
      Process.daemon(true, true)
      w.write("daemon #{Process.pid}")
      w.close
      exit!(0)
    end
    w.close
    wait_bounded(pid)
    Timeout.timeout(10) { expect(r.read).to match(/\Abefore;child;before;child;daemon \d+\z/) }
    r.close
  end

  it "forking inside a Signal.trap handler neither raises nor deadlocks" do
    agent = TestAgent.shared.clear
    t = Exporter::Transport.new(url: agent.url)
    expect(t.send_traces([SpanFactory.trace(1)])).to be_ok
    result = Queue.new
    old = Signal.trap("USR2") do
      pid = fork do
        ok = t.send_traces([SpanFactory.trace(2)]).ok?
        exit!(ok ? 0 : 3)
      end
      result << pid
    rescue Exception => e # rubocop:disable Lint/RescueException
      result << e
    end
    begin
      Process.kill("USR2", Process.pid)
      pid = Timeout.timeout(10) { result.pop }
      expect(pid).to be_a(Integer)
      expect(wait_bounded(pid).exitstatus).to eq(0)
      expect(t.send_traces([SpanFactory.trace(3)])).to be_ok
      expect(agent.traces.map { |tr| tr.first["trace_id"] }.sort).to eq([1, 2, 3])
    ensure
      Signal.trap("USR2", old)
      t.close
    end
  end
end
