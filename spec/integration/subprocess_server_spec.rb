# frozen_string_literal: true

require "json"
require "net/http"
require "set"
require "tmpdir"

# Debian's Puma without preload_app!: the master never loads the gem, so
# thread mode has no forking parent to run a listener in. With
# EXPORTER_SIDECAR=subprocess every worker is a client of one per-user
# helper: no worker holds an agent connection, the helper does, and after
# a graceful stop every trace arrived exactly once.
RSpec.describe "Puma without preload_app!, subprocess mode" do # rubocop:disable RSpec/DescribeClass
  fixtures = File.expand_path("../fixtures", __dir__)
  requests = 100

  let(:agent) { TestAgent.shared.clear }
  let(:xdg) { Dir.mktmpdir("exporter-xdg") }

  before(:all) { HelperProcesses.subreaper(true) }
  after(:all) { HelperProcesses.subreaper(false) }

  before do
    skip "exporter-sidecar not built (rake compile)" unless File.executable?(HelperProcesses::HELPER)
  end

  after do
    kill_hard(@pid) if @pid
    HelperProcesses.kill_helpers(xdg)
    FileUtils.rm_rf(xdg)
  end

  def get(port, path, id = 0)
    Net::HTTP.start("127.0.0.1", port, open_timeout: 1, read_timeout: 15) { |h| h.get(path, "X-Trace-Id" => id.to_s) }
  end

  it "workers share one helper; the master never loads the gem", timeout: 180 do
    port = TestAgent.free_port
    log = File.join(xdg, "puma.log")
    env = { "EXPORTER_AGENT_URL" => agent.url, "RUBYOPT" => "-I#{lib_dir}", "EXPORTER_SIDECAR" => "subprocess",
            "XDG_RUNTIME_DIR" => xdg, "EXPORTER_SIDECAR_IDLE_SECONDS" => "60" }
    @pid = Process.spawn(env, "puma", "-w", "2", "-t", "1:1", "-b", "tcp://127.0.0.1:#{port}", "config.ru",
                         chdir: fixtures, out: log, err: log, pgroup: true)
    eventually(timeout: 30, interval: 0.1) do
      get(port, "/", 1).is_a?(Net::HTTPOK)
    rescue SystemCallError, IOError, Net::OpenTimeout, Net::ReadTimeout
      false
    end
    ids = Queue.new
    (2..requests + 1).each { |i| ids << i }
    4.times.map do
      Thread.new do
        while (id = (ids.pop(true) rescue nil)) # rubocop:disable Style/RescueModifier
          raise "HTTP error" unless get(port, "/", id).is_a?(Net::HTTPOK)
        end
      end
    end.each { |t| t.join(60) }

    statuses = eventually(timeout: 20) do
      seen = {}
      12.times do
        s = JSON.parse(get(port, "/status").body, symbolize_names: true)
        seen[s[:pid]] = s[:sidecar]
      end
      seen if seen.size >= 2
    end
    socket = File.join(xdg, "exporter", "sidecar-#{Exporter::VERSION}.sock")
    agent_port = URI(agent.url).port
    statuses.each do |pid, s|
      expect(s).to include(mode: "subprocess", role: "client", socket: socket)
      expect(AgentSockets.connections(pid, agent_port)).to eq(0), "worker #{pid} holds an agent connection"
    end
    expect(File.read("/proc/#{@pid}/maps")).not_to include("exporter.so")
    # Started by the first worker's first handover (its writer flushes every
    # 0.5 s). Both workers may run a launcher at once: the one that loses
    # the lock exits once the winner answers, so exactly one stays.
    helpers = begin
      eventually(timeout: 10) { (h = HelperProcesses.helper_pids(xdg)).size == 1 && h }
    rescue RuntimeError
      HelperProcesses.helper_pids(xdg)
    end
    expect(helpers.size).to eq(1), lambda {
      helper_log = Dir[File.join(xdg, "exporter", "*.log")].map { |f| File.read(f) }.join
      "helpers serving #{xdg}: #{helpers.to_h { |p| [p, HelperProcesses.proc_state(p)] }}; helper log:\n" \
        "#{helper_log}\npuma log:\n#{File.read(log)}"
    }
    eventually(timeout: 10) { AgentSockets.connections(helpers.first, agent_port).positive? }
    # Every worker keeps its connection (plus this query's own).
    expect(Exporter::Sidecar.helper_status(socket: socket)).to include(connections_open: statuses.size + 1)

    Process.kill(:TERM, @pid)
    status = wait_bounded(@pid, timeout: 30)
    @pid = nil
    expect(status.success? || status.termsig == Signal.list["TERM"]).to be(true), status.inspect
    want = (1..requests + 1).to_a
    traces = eventually(timeout: 15) { (t = agent.traces).size >= want.size && t }
    expect(traces.map { |t| t.first["trace_id"] }.sort).to eq(want)
    expect(traces.map { |t| t.first["meta"]["worker.pid"] }.uniq.size).to be >= 2
    expect(agent.check_failures).to be_nil
    expect(Exporter::Sidecar.helper_status(socket: socket)).to include(traces_received: want.size,
                                                                        traces_sent: want.size)
  end
end
