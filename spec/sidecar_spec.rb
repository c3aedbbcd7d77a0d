# frozen_string_literal: true

require "set"
require "json"
require "tmpdir"

# Thread mode with real forks and the real agent: the spec process is the
# forking parent (a listener from its first fork, as in `auto`), its
# children are clients.
RSpec.describe Exporter::Sidecar do
  let!(:agent) { TestAgent.shared.clear }
  let(:transport) { Exporter::Transport.new(url: agent.url, service: "sidecar-spec") }
  let!(:writer) { Exporter::Writer.new(transport: transport, flush_interval: 60) }

  before do
    skip "EXPORTER_SIDECAR=#{ENV['EXPORTER_SIDECAR']}" unless %w[auto thread].include?(ENV.fetch("EXPORTER_SIDECAR", "auto"))
  end

  after do
    Exporter::Native.sidecar_test_stall(false)
    writer.stop(timeout: 2)
  end

  def trace(id)
    [{ trace_id: id, span_id: id, name: "job", resource: "r", start: 1, duration: 1,
       meta: { "pid" => Process.pid.to_s } }]
  end

  def expect_trace_ids(ids)
    got = eventually_via_sidecar { (t = agent.traces).size >= ids.size && t }
    expect(got.map { |t| t.first["trace_id"] }.sort).to eq(ids.sort)
  end

  # Each id arrived, at least once (sent direct: no listener involved).
  def expect_arrived(ids)
    got = eventually(timeout: 10) { (t = agent.traces).size >= ids.size && t }
    expect(got.map { |t| t.first["trace_id"] }.uniq.sort).to eq(ids.sort)
  end

  # Runs the block in a forked child (fork_and_wait: exit! 0, or 1 if it
  # raised) with the write end of a pipe; [its exit status, all it wrote].
  def fork_reading(timeout: 30)
    r, w = IO.pipe
    status = fork_and_wait(timeout: timeout) do
      r.close
      yield w
    end
    w.close
    [status, r.read]
  ensure
    r&.close
  end

  # Runs the block in a forked child that reports a Hash back as JSON.
  def in_child(timeout: 30)
    status, out = fork_reading(timeout: timeout) do |w|
      w.write(JSON.generate(yield))
      w.close
    end
    expect(status).to be_success
    JSON.parse(out, symbolize_names: true)
  end

  it "a forked child is a client: what it flushed is held by the parent, sent once, and it holds no agent connection" do
    writer.write(trace(1)) # written before fork: the parent's to send
    report = in_child do
      ids = (100...120).to_a
      ids.each { |id| writer.write(trace(id)) }
      flushed = writer.flush(timeout: 10)
      { flushed: flushed, status: described_class.status,
        agent_connections: AgentSockets.connections(Process.pid, URI(agent.url).port) }
    end
    expect(report[:flushed]).to be(true)
    expect(report[:status]).to include(mode: "thread", role: "client", socket: nil)
    expect(report[:status][:counters]).to include(traces_handed_over: 20, traces_direct: 0)
    expect(report[:agent_connections]).to eq(0)
    expect(described_class.status).to include(mode: :thread, role: :listener)
    expect(writer.flush(timeout: 5)).to be(true)
    expect_trace_ids([1] + (100...120).to_a)
    expect(agent.check_failures).to be_nil
  end

  it "a child SIGKILLed right after flush returned loses nothing" do
    pid = fork do
      (200...220).each { |id| writer.write(trace(id)) }
      exit!(3) unless writer.flush(timeout: 10)
      Process.kill(:KILL, Process.pid)
    end
    status = wait_bounded(pid, timeout: 30)
    expect(status.termsig).to eq(Signal.list["KILL"])
    expect_trace_ids((200...220).to_a)
  end

  it "with the listener unable to read, the child sends direct, counted, and a SIGKILL after flush loses nothing" do
    Exporter::Native.sidecar_test_stall(true)
    status, out = fork_reading do |w|
      (300...320).each { |id| writer.write(trace(id)) }
      w.puts(JSON.generate(flushed: writer.flush(timeout: 15), counters: described_class.status[:counters]))
      w.close
      Process.kill(:KILL, Process.pid)
    end
    report = JSON.parse(out, symbolize_names: true)
    expect(status.termsig).to eq(Signal.list["KILL"])
    expect(report[:flushed]).to be(true)
    expect(report[:counters]).to include(traces_direct: 20, traces_handed_over: 0)
    expect(report[:counters][:frames_timed_out]).to be >= 1
    expect_arrived((300...320).to_a)
  end

  # Puma's master runs its graceful stop from its SIGTERM trap, which may
  # land while it forks (its listener paused): its workers exit meanwhile.
  # At exit a handover waits 2 s at most, so what the listener did not
  # take still goes direct within the 5 s exit budget.
  it "a child exiting while the listener does not read sends direct within its exit budget" do
    Exporter::Native.sidecar_test_stall(true)
    status, err = fork_reading do |w|
      $stderr.reopen(w)
      (400...410).each { |id| writer.write(trace(id)) }
      Exporter::ExitFlush.run # what the process's at_exit runs; no flush before it
    end
    expect(status).to be_success
    expect(err).to match(/did not answer within 2 s/)
    expect(err).not_to match(/lost/) # the exit report: nothing left unsent after its 5 s
    expect_arrived((400...410).to_a)
  end

  it "a child of a child runs direct (Puma's fork_worker, a fork inside a worker)" do
    report = in_child do
      grandchild = in_child do
        (400...405).each { |id| writer.write(trace(id)) }
        { flushed: writer.flush(timeout: 10), status: described_class.status }
      end
      { grandchild: grandchild, status: described_class.status }
    end
    expect(report[:status]).to include(role: "client")
    expect(report[:grandchild][:flushed]).to be(true)
    expect(report[:grandchild][:status]).to include(mode: "direct", role: "none")
    expect(report[:grandchild][:status][:counters]).to include(traces_handed_over: 0)
    expect_trace_ids((400...405).to_a)
  end

  # Resque-like: fork, write, flush, exit! per job, from a fresh parent
  # (a listener from its first fork). Job time is in bench/sidecar.rb.
  it "fork per job x 100 (fork, write, flush, exit!): every trace arrives exactly once" do
    script = <<~RUBY
      require "exporter"
      w = Exporter::Writer.new(transport: Exporter::Transport.new(url: #{agent.url.inspect}), flush_interval: 60)
      100.times do |i|
        pid = fork { w.write([{ trace_id: 5000 + i, span_id: 1, name: "job", start: 1, duration: 1 }]); exit!(w.flush(timeout: 10) ? 0 : 1) }
        _, st = Process.wait2(pid)
        abort "job \#{i}: flush failed" unless st.success?
      end
      puts Exporter::Sidecar.status[:role]
      exit(Exporter::Sidecar.flush(timeout: 10) ? 0 : 1)
    RUBY
    out, err, st = capture_bounded(ruby_bin, "-I#{lib_dir}", "-e", script, timeout: 50)
    expect(st).to be_success, err
    expect(out.strip).to eq("listener")
    got = eventually(timeout: 15) { (t = agent.traces).size >= 100 && t }
    expect(got.map { |t| t.first["trace_id"] }.sort).to eq((5000...5100).to_a)
  end

  it "a worker never starts a listener" do
    report = in_child do
      { started: described_class.start(log: nil), status: described_class.status }
    end
    expect(report[:started]).to be(false)
    expect(report[:status]).to include(role: "client")
  end

  it "exposures from 4 workers are deduplicated once by the listener" do
    exposures = Exporter::Exposures.new(url: agent.url, flush_interval: 60, service: "sidecar-spec")
    4.times do |i|
      in_child do
        exposures.record(flag: "checkout", allocation: "a1", variant: "on", subject_id: "user-1")
        exposures.record(flag: "checkout", allocation: "a1", variant: "on", subject_id: "worker-#{i}")
        { flushed: exposures.flush(timeout: 10) }
      end
    end
    got = eventually_via_sidecar { (e = agent.exposures).size >= 5 && e }
    subjects = got.map { |e| e["subject"]["id"] }
    expect(subjects.sort).to eq(%w[user-1 worker-0 worker-1 worker-2 worker-3])
  ensure
    exposures&.close(timeout: 2)
  end

  # The listener's dedup marks an exposure sent only once the agent
  # accepted it: refused for good (400), it is un-marked, and the next
  # identical one is sent again, from the same worker (which learns it
  # from the listener's next Ack) or another; once accepted (202), the
  # same exposure from another worker is deduplicated.
  it "an exposure the agent refused for good is sent again; once accepted, it is deduplicated" do
    server = ScriptedServer.new { |n| n.zero? ? [400, {}, "{}"] : [202, {}, "{}"] }
    exposures = Exporter::Exposures.new(url: server.url, flush_interval: 60, service: "sidecar-spec")
    x = { flag: "checkout", allocation: "a1", variant: "on", subject_id: "user-x" }
    parent_r, child_w = IO.pipe # child -> parent
    child_r, parent_w = IO.pipe # parent -> child
    pid = fork do
      parent_r.close
      parent_w.close
      out = { first: exposures.record(**x), first_flushed: exposures.flush(timeout: 10) }
      child_w.puts("handed over")
      child_r.gets # the listener has sent it, and the agent refused it
      out[:before_next_ack] = exposures.record(**x)
      exposures.record(**x, subject_id: "user-y")
      out[:y_flushed] = exposures.flush(timeout: 10) # its Ack says: un-marked
      out[:again] = exposures.record(**x)
      out[:again_flushed] = exposures.flush(timeout: 10)
      out[:counters] = described_class.status[:counters]
      child_w.puts(JSON.generate(out))
      exit!(0)
    end
    child_r.close
    child_w.close
    expect(parent_r.gets(chomp: true)).to eq("handed over")
    expect(described_class.flush(timeout: 10)).to be(false)
    expect(described_class.status[:counters]).to include(exposures_unmarked: 1)
    parent_w.puts("go")
    report = JSON.parse(parent_r.gets, symbolize_names: true)
    status = wait_bounded(pid, timeout: 30)
    pid = nil
    expect(status).to be_success
    expect(report).to include(first: true, first_flushed: true, y_flushed: true, again: true, again_flushed: true)
    # Until its next handover the worker does not know: still suppressed.
    expect(report[:before_next_ack]).to be(false)
    expect(report[:counters]).to include(exposures_handed_over: 3, exposures_direct: 0)
    expect(described_class.flush(timeout: 10)).to be(true)
    in_child { { recorded: exposures.record(**x), flushed: exposures.flush(timeout: 10) } }
    expect(described_class.flush(timeout: 10)).to be(true)
    subjects = server.received.select { |r| r.path == "/evp_proxy/v2/api/v2/exposures" }
                     .map { |r| JSON.parse(r.body)["exposures"].map { |e| e.dig("subject", "id") } }
    expect(subjects.flatten.sort).to eq(%w[user-x user-x user-y])
    expect(described_class.status[:counters]).to include(exposures_unmarked: 1)
    expect(described_class.status[:counters][:exposures_deduplicated]).to be >= 1
  ensure
    kill_hard(pid) if pid
    [parent_r, parent_w].each { |io| io&.close unless io&.closed? }
    exposures&.close(timeout: 2)
    server&.close
  end

  it "evaluation counts from 4 workers are summed into one row" do
    server = EvpRecorder.new
    evals = Exporter::FlagEvaluations.new(url: server.url, flush_interval: 60, service: "sidecar-spec")
    4.times do
      in_child do
        3.times { evals.record(flag: "checkout", variant: "on", allocation: "a1") }
        { flushed: evals.flush(timeout: 10) }
      end
    end
    eventually_via_sidecar { server.bodies.any? }
    rows = server.bodies.flat_map { |b| b["flagEvaluations"] }
    expect(rows.size).to eq(1)
    expect(rows.first).to include("evaluation_count" => 12, "flag" => { "key" => "checkout" })
  ensure
    evals&.close(timeout: 2)
    server&.close
  end
end

RSpec.describe "EXPORTER_SIDECAR modes" do # rubocop:disable RSpec/DescribeClass
  def status_after_fork(mode, env = {})
    script = <<~RUBY
      require "exporter"; require "json"
      r, w = IO.pipe
      pid = fork { w.write(JSON.generate(Exporter::Sidecar.status)); w.close; exit!(0) }
      w.close; out = r.read; Process.wait(pid)
      puts JSON.generate(parent: Exporter::Sidecar.status, child: JSON.parse(out))
    RUBY
    out, err, st = capture_bounded({ "EXPORTER_SIDECAR" => mode }.merge(env), ruby_bin, "-I#{lib_dir}", "-e", script)
    expect(st).to be_success, err
    [JSON.parse(out, symbolize_names: true), err]
  end

  it "off: no listener, no client: today's direct behaviour" do
    s, = status_after_fork("off")
    expect(s[:parent]).to include(mode: "direct", role: "none", configured: "off")
    expect(s[:child]).to include(mode: "direct", role: "none")
  end

  it "auto: direct until the first fork, then listener and client" do
    s, = status_after_fork("auto")
    expect(s[:parent]).to include(mode: "thread", role: "listener")
    expect(s[:child]).to include(mode: "thread", role: "client")
  end

  it "subprocess: parent and child are each a client of the per-user helper (nothing starts until a handover)" do
    Dir.mktmpdir("exporter-xdg") do |xdg|
      s, err = status_after_fork("subprocess", "XDG_RUNTIME_DIR" => xdg)
      socket = File.join(xdg, "exporter", "sidecar-#{Exporter::VERSION}.sock")
      expect(s[:parent]).to include(mode: "subprocess", role: "client", socket: socket, configured: "subprocess")
      expect(s[:child]).to include(mode: "subprocess", role: "client", socket: socket)
      expect(err).to eq("")
      expect(File.exist?(socket)).to be(false)
    end
  end
end
