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
  # Meanwhile, every 20 ms, the agent connections of the master and of
  # each of its children (workers) are sampled: @agent_conns[pid] = most seen.
  def drive(port)
    @agent_conns = Hash.new(0)
    agent_port = URI(agent.url).port
    driving = true
    sampler = Thread.new do
      while driving
        pids = [@pid] + File.read("/proc/#{@pid}/task/#{@pid}/children").split.map(&:to_i)
        pids.each do |p|
          @agent_conns[p] = [@agent_conns[p], AgentSockets.connections(p, agent_port)].max
        rescue Errno::ENOENT, Errno::ESRCH
          nil
        end
        sleep 0.02
      end
    end
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
  ensure
    driving = false
    sampler&.join(5)
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
        expect(@agent_conns[pid]).to eq(0), "worker #{pid} held an agent connection during the requests"
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

  # Puma's log says when the worker that replaced a killed one booted.
  def wait_for_replacement(workers)
    eventually(timeout: 30, interval: 0.05) { File.read(@log).scan(/Worker \d+ \(PID: \d+\) booted/).size > workers }
  end

  # Every trace arrived exactly once (`at_least_once: true`: duplicates
  # allowed, nothing missing).
  def expect_all_traces(killed: true, at_least_once: false)
    want = (1..REQUESTS + 1).to_a
    want += (KILL_FIRST...KILL_FIRST + 20).to_a if killed
    traces = begin
      eventually(timeout: 15) do
        got = agent.traces
        got if got.map { |t| t.first["trace_id"] }.uniq.size >= want.size
      end
    rescue RuntimeError
      agent.traces
    end
    ids = traces.map { |t| t.first["trace_id"] }.sort
    ids = ids.uniq if at_least_once
    expect(ids).to eq(want), lambda {
      "missing #{(want - ids).inspect}, extra #{(ids - want).inspect}; server log:\n#{File.read(@log).lines.last(40).join}"
    }
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
    wait_for_replacement(4)
    status = stop_server(:TERM)
    # Puma re-raises SIGTERM once its graceful stop is done.
    expect(status.success? || status.termsig == Signal.list["TERM"]).to be(true), status.inspect
    expect_all_traces
  end

  # Puma's master runs its graceful stop inside its SIGTERM trap handler
  # and then raises SignalException wherever its main thread was: a TERM
  # right after a kill lands while the master forks the replacement, in
  # the middle of the fork hooks. The runtime must not stay paused (what
  # the listener holds would be lost at exit). Workers whose last handover
  # the paused listener did not acknowledge in time send it direct, so a
  # trace may arrive twice here: at least once, none lost.
  it "puma cluster: a TERM while the master forks a worker's replacement loses nothing", timeout: 180 do
    port = TestAgent.free_port
    start_server(["puma", "-w", "4", "-t", "1:1", "--preload", "-b", "tcp://127.0.0.1:#{port}", "config.ru"], port)
    expect(drive(port).size).to be >= 2
    kill_a_worker(port)
    status = stop_server(:TERM)
    expect(status.success? || status.termsig == Signal.list["TERM"]).to be(true), status.inspect
    expect_all_traces(at_least_once: true)
  end

  # Roles seen through /status: {pid => status}, at least `min` workers.
  def worker_statuses(port, min)
    eventually(timeout: 20) do
      seen = {}
      24.times do
        s = JSON.parse(get(port, "/status").body, symbolize_names: true)
        seen[s[:pid]] = s[:sidecar]
      end
      seen if seen.size >= min
    end
  end

  def parent_of(pid) = File.read("/proc/#{pid}/stat").split(") ").last.split[1].to_i

  # Puma's fork_worker: workers 1..3 are forked by worker 0, not by the
  # master. Without preload_app! the master never loads the app (nor the
  # gem), so worker 0 is the first process of ours that forks: it becomes
  # the listener, and the workers it forks are its clients (the same rule
  # as a master's). A refork (SIGURG) forks new clients from it again.
  it "puma fork_worker without preload: worker 0 is the listener, the workers it forks are its clients; nothing lost",
     timeout: 180 do
    port = TestAgent.free_port
    start_server(["puma", "-w", "4", "-t", "1:1", "--fork-worker", "-b", "tcp://127.0.0.1:#{port}", "config.ru"], port)
    expect(drive(port).size).to be >= 2
    statuses = worker_statuses(port, 4)
    agent_port = URI(agent.url).port
    if SIDECAR
      listener, clients = statuses.partition { |_, s| s[:role] == "listener" }
      expect(listener.size).to eq(1)
      zero = listener.first.first
      expect(parent_of(zero)).to eq(@pid)
      clients.each do |pid, s|
        expect(s).to include(mode: "thread", role: "client")
        expect(parent_of(pid)).to eq(zero)
        expect(AgentSockets.connections(pid, agent_port)).to eq(0), "worker #{pid} holds an agent connection"
      end
      expect(AgentSockets.connections(@pid, agent_port)).to eq(0)
      eventually(timeout: 10) { AgentSockets.connections(zero, agent_port).positive? }
    else
      statuses.each_value { |s| expect(s).to include(mode: "direct", role: "none") }
    end
    stop_server(:TERM)
    expect_all_traces(killed: false)
  end

  # With preload_app! as well, the master is the listener: worker 0 is its
  # client, and the workers forked by worker 0 are children of a client,
  # which run direct (each its own agent connection).
  it "puma fork_worker with preload_app!: worker 0 is a client, the workers it forks run direct; nothing lost",
     timeout: 180 do
    port = TestAgent.free_port
    start_server(["puma", "-w", "4", "-t", "1:1", "--preload", "--fork-worker", "-b", "tcp://127.0.0.1:#{port}",
                  "config.ru"], port)
    expect(drive(port).size).to be >= 2
    statuses = worker_statuses(port, 4)
    if SIDECAR
      zero, direct = statuses.partition { |_, s| s[:role] == "client" }
      expect(zero.size).to eq(1)
      expect(parent_of(zero.first.first)).to eq(@pid)
      direct.each do |pid, s|
        expect(s).to include(mode: "direct", role: "none")
        expect(parent_of(pid)).to eq(zero.first.first)
      end
    else
      statuses.each_value { |s| expect(s).to include(mode: "direct", role: "none") }
    end
    kill_a_worker(port)
    stop_server(:TERM)
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
