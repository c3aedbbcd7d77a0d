# frozen_string_literal: true

require "net/http"

# Real preforking servers from Debian: the app builds its exporter at boot
# in the master, workers write a trace per request, and after a graceful
# stop the agent holds every trace, from at least two worker pids.
RSpec.describe "preforking servers" do # rubocop:disable RSpec/DescribeClass
  FIXTURES = File.expand_path("../fixtures", __dir__)
  REQUESTS = 60

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

  def expect_all_traces
    traces = eventually(timeout: 10) do
      got = agent.traces
      got if got.size >= REQUESTS + 1
    end
    ids = traces.map { |t| t.first["trace_id"] }.sort
    expect(ids).to eq((1..REQUESTS + 1).to_a)
    worker_pids = traces.map { |t| t.first["meta"]["worker.pid"] }.uniq
    expect(worker_pids.size).to be >= 2
  end

  after { kill_hard(@pid) if @pid }

  it "puma cluster (2 workers, preload_app!) delivers every trace", timeout: 120 do
    port = TestAgent.free_port
    start_server(["puma", "-w", "2", "-t", "1:1", "--preload", "-b", "tcp://127.0.0.1:#{port}", "config.ru"], port)
    expect(drive(port).size).to be >= 2
    status = stop_server(:TERM)
    # Puma re-raises SIGTERM once its graceful stop is done.
    expect(status.success? || status.termsig == Signal.list["TERM"]).to be(true), status.inspect
    expect_all_traces
  end

  it "unicorn cluster (2 workers, preload_app true) delivers every trace", timeout: 120 do
    port = TestAgent.free_port
    start_server(["unicorn", "-c", "unicorn.conf.rb", "-l", "127.0.0.1:#{port}", "config.ru"], port)
    expect(drive(port).size).to be >= 2
    expect(stop_server(:QUIT)).to be_success
    expect_all_traces
  end
end
