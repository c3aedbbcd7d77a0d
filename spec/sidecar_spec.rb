# frozen_string_literal: true

require "set"
require "json"
require "open3"
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

  # Runs the block in a forked child that reports a Hash back as JSON.
  def in_child(timeout: 30)
    r, w = IO.pipe
    status = fork_and_wait(timeout: timeout) do
      r.close
      w.write(JSON.generate(yield))
      w.close
    end
    w.close
    out = r.read
    r.close
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
    expect(report[:status][:counters]).to include(handed_over: 20, sent_direct: 0)
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

  it "with the listener unable to read, the child sends direct, counted, and nothing is lost" do
    Exporter::Native.sidecar_test_stall(true)
    report = in_child do
      (300...320).each { |id| writer.write(trace(id)) }
      { flushed: writer.flush(timeout: 15), counters: described_class.status[:counters] }
    end
    expect(report[:flushed]).to be(true)
    expect(report[:counters]).to include(sent_direct: 20, handed_over: 0)
    expect(report[:counters][:timeouts]).to be >= 1
    got = eventually(timeout: 10) { (t = agent.traces).size >= 20 && t }
    expect(got.map { |t| t.first["trace_id"] }.uniq.sort).to eq((300...320).to_a)
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
    expect(report[:grandchild][:status][:counters]).to include(handed_over: 0)
    expect_trace_ids((400...405).to_a)
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
    out, err, st = Open3.capture3({ "EXPORTER_SIDECAR" => mode }.merge(env), ruby_bin, "-I#{lib_dir}", "-e", script)
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
