# frozen_string_literal: true

require "net/http"
require "json"

# Real preforking servers from Debian: the app builds its exporter at boot
# in the master, workers write a trace per request, and after a graceful
# stop the agent holds every trace, from at least two worker pids. With
# the sidecar on (the default), workers are clients of the master's
# listener: no worker holds an agent connection, the master does, and a
# worker SIGKILLed right after a flush loses nothing.
RSpec.describe "preforking servers" do # rubocop:disable RSpec/DescribeClass
  FIXTURES = File.expand_path("../fixtures", __dir__)
  REQUESTS = 300
  KILL_FIRST = 10_000
  SIDECAR = %w[auto thread].include?(ENV.fetch("EXPORTER_SIDECAR", "auto"))

  let(:agent) { TestAgent.shared.clear }

  after { expect(agent.check_failures).to be_nil }

  def start_server(argv, port)
    log = File.join(Dir.tmpdir, "exporter-server-#{port}.log")
    env = { "EXPORTER_AGENT_URL" => agent.url, "RUBYOPT" => "-I#{lib_dir}" }
    @pid = Process.spawn(env, *argv, chdir: FIXTURES, out: log, err: log, pgroup: true)
    @log = log
    eventually(timeout: 30, interval: 0.1) do
      Net::HTTP.start("127.0.0.1", port, open_timeout: 0.5, read_timeout: 2) do |h|
        h.get("/", "X-Trace-Id" => "1").is_a?(Net::HTTPOK)
      end
    rescue SystemCallError, IOError, Net::OpenTimeout, Net::ReadTimeout
      false
    end
  end

  def stop_server(signal)
    Process.kill(signal, @pid)
    status = wait_bounded(@pid, timeout: 30)
    @pid = nil
    status
  ensure
    kill_hard(@pid) if @pid
  end

  # REQUESTS requests over 6 concurrent connections; returns serving pids.
  def drive(port)
    ids = Queue.new
    (2..REQUESTS + 1).each { |i| ids << i }
    pids = Queue.new
    6.times.map do
      Thread.new do
        Net::HTTP.start("127.0.0.1", port, read_timeout: 10) do |h|
          while (id = (ids.pop(true) rescue nil)) # rubocop:disable Style/RescueModifier
            res = h.get("/", "X-Trace-Id" => id.to_s)
            raise "HTTP #{res.code}" unless res.is_a?(Net::HTTPOK)

            pids << res.body.to_i
          end
        end
      end
    end.each { |th| th.join(60) }
    Array.new(pids.size) { pids.pop }.uniq
  end

  def get(port, path, id = 0)
    Net::HTTP.start("127.0.0.1", port, read_timeout: 15) { |h| h.get(path, "X-Trace-Id" => id.to_s) }
  end

  # Every worker answers thread mode, role client (direct with the
  # sidecar off); no worker holds an agent connection, the master does.
  def expect_sidecar_roles(port, workers)
    statuses = eventually(timeout: 20) do
      seen = {}
      (workers * 6).times do
        s = JSON.parse(get(port, "/status").body, symbolize_names: true)
        seen[s[:pid]] = s[:sidecar]
      end
      seen if seen.size >= 2
    end
    agent_port = URI(agent.url).port
    statuses.each do |pid, s|
      if SIDECAR
        expect(s).to include(mode: "thread", role: "client")
        expect(AgentSockets.connections(pid, agent_port)).to eq(0), "worker #{pid} holds an agent connection"
      else
        expect(s).to include(mode: "direct", role: "none")
      end
    end
    return unless SIDECAR

    eventually(timeout: 10) { AgentSockets.connections(@pid, agent_port).positive? }
  end

  # A request that writes 20 traces, flushes and SIGKILLs its worker.
  def kill_a_worker(port)
    res = get(port, "/kill", KILL_FIRST)
    raise "worker answered #{res.code}: #{res.body}" # it should have died
  rescue EOFError, Errno::ECONNRESET, Net::ReadTimeout
    nil
  end

  def expect_all_traces(killed: true)
    want = (1..REQUESTS + 1).to_a
    want += (KILL_FIRST...KILL_FIRST + 20).to_a if killed
    traces = eventually(timeout: 15) do
      got = agent.traces
      got if got.size >= want.size
    end
    ids = traces.map { |t| t.first["trace_id"] }.sort
    expect(ids).to eq(want)
    worker_pids = traces.map { |t| t.first["meta"]["worker.pid"] }.uniq
    expect(worker_pids.size).to be >= 2
  end

  after { kill_hard(@pid) if @pid }

  it "puma cluster (4 workers, preload_app!) delivers every trace exactly once, a killed worker's too", timeout: 180 do
    port = TestAgent.free_port
    start_server(["puma", "-w", "4", "-t", "1:1", "--preload", "-b", "tcp://127.0.0.1:#{port}", "config.ru"], port)
    expect(drive(port).size).to be >= 2
    expect_sidecar_roles(port, 4)
    kill_a_worker(port)
    status = stop_server(:TERM)
    # Puma re-raises SIGTERM once its graceful stop is done.
    expect(status.success? || status.termsig == Signal.list["TERM"]).to be(true), status.inspect
    expect_all_traces
  end

  it "unicorn cluster (2 workers, preload_app true) delivers every trace exactly once, a killed worker's too",
     timeout: 180 do
    port = TestAgent.free_port
    start_server(["unicorn", "-c", "unicorn.conf.rb", "-l", "127.0.0.1:#{port}", "config.ru"], port)
    expect(drive(port).size).to be >= 2
    expect_sidecar_roles(port, 2)
    kill_a_worker(port)
    expect(stop_server(:QUIT)).to be_success
    expect_all_traces
  end
end
