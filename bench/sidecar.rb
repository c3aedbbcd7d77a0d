#!/usr/bin/env ruby
# frozen_string_literal: true

# Sidecar A/B: the same 4-worker Puma server (preload_app!, the app of
# spec/fixtures/config.ru) with EXPORTER_SIDECAR=auto and =off, driven
# with REQUESTS requests against a real ddapm-test-agent. Per run:
# agent connections and threads per process, PSS per worker, CPU (user +
# system) per trace in the workers and in the master, and traces lost when
# a worker is SIGKILLed under load (after a request that wrote and flushed
# 20 traces, and with requests in flight). Then a fork-per-job loop (fork,
# write, flush, exit!) x JOBS with and without the sidecar: ms per job.
#   ruby bench/sidecar.rb            (REQUESTS=2000 JOBS=100)
root = File.expand_path("..", __dir__)
$LOAD_PATH.unshift(File.join(root, "lib"), File.join(root, "spec", "support"))
require "exporter"
require "json"
require "net/http"
require "set"
require "test_agent"
require "process_helpers"
require "agent_sockets"

include ProcessHelpers # rubocop:disable Style/MixinUsage

REQUESTS = Integer(ENV.fetch("REQUESTS", "2000"))
JOBS = Integer(ENV.fetch("JOBS", "100"))
FIXTURES = File.join(root, "spec", "fixtures")

def proc_cpu(pid)
  f = File.read("/proc/#{pid}/stat").split(") ").last.split
  (f[11].to_i + f[12].to_i) / 100.0 # utime + stime, in clock ticks (USER_HZ = 100)
rescue Errno::ENOENT
  0.0
end

def pss_kb(pid) = File.read("/proc/#{pid}/smaps_rollup")[/^Pss:\s+(\d+)/, 1].to_i
def threads(pid) = Dir.children("/proc/#{pid}/task").size
def children(pid) = File.read("/proc/#{pid}/task/#{pid}/children").split.map(&:to_i)

def get(port, path, id)
  Net::HTTP.start("127.0.0.1", port, read_timeout: 15) { |h| h.get(path, "X-Trace-Id" => id.to_s) }
end

def server_run(mode, agent)
  agent.clear
  port = TestAgent.free_port
  env = { "EXPORTER_AGENT_URL" => agent.url, "RUBYOPT" => "-I#{File.join(__dir__, '..', 'lib')}",
          "EXPORTER_SIDECAR" => mode }
  log = File.join(Dir.tmpdir, "exporter-bench-sidecar-#{mode}.log")
  pid = Process.spawn(env, "puma", "-w", "4", "-t", "2:2", "--preload", "-b", "tcp://127.0.0.1:#{port}",
                      "config.ru", chdir: FIXTURES, out: log, err: log, pgroup: true)
  eventually(timeout: 30, interval: 0.1) { get(port, "/", 1).is_a?(Net::HTTPOK) rescue false } # rubocop:disable Style/RescueModifier
  workers = eventually(timeout: 10) { (c = children(pid)).size == 4 && c }
  cpu0 = ([pid] + workers).to_h { |p| [p, proc_cpu(p)] }
  ids = Queue.new
  (2..REQUESTS + 1).each { |i| ids << i }
  max_conns = Hash.new(0)
  sampler = Thread.new do
    until ids.empty?
      ([pid] + workers).each do |p|
        n = (AgentSockets.connections(p, URI(agent.url).port) rescue 0) # rubocop:disable Style/RescueModifier
        max_conns[p] = [max_conns[p], n].max
      end
      sleep 0.05
    end
  end
  killer = Thread.new do
    sleep 0.5
    get(port, "/kill", 10_000) rescue nil # rubocop:disable Style/RescueModifier
  end
  8.times.map do
    Thread.new do
      Net::HTTP.start("127.0.0.1", port, read_timeout: 15) do |h|
        while (id = (ids.pop(true) rescue nil)) # rubocop:disable Style/RescueModifier
          h.get("/", "X-Trace-Id" => id.to_s)
        end
      end
    rescue StandardError
      retry unless ids.empty?
    end
  end.each(&:join)
  killer.join
  sampler.join
  live = workers.select { |w| File.exist?("/proc/#{w}") }
  row = {
    mode: mode,
    worker_conns_max: workers.map { |w| max_conns[w] }.max,
    master_conns_max: max_conns[pid],
    worker_threads: live.map { |w| threads(w) }.max,
    master_threads: threads(pid),
    worker_pss_kb: live.sum { |w| pss_kb(w) } / [live.size, 1].max,
    worker_cpu_s: live.sum { |w| proc_cpu(w) - cpu0.fetch(w, 0) }.round(2),
    master_cpu_s: (proc_cpu(pid) - cpu0[pid]).round(2)
  }
  Process.kill(:TERM, pid)
  wait_bounded(pid, timeout: 30)
  want = (1..REQUESTS + 1).to_a + (10_000...10_020).to_a
  got = eventually(timeout: 20) { (t = agent.traces).size >= want.size - 50 && t } rescue agent.traces # rubocop:disable Style/RescueModifier
  seen = got.map { |t| t.first["trace_id"] }
  row[:lost] = (want - seen).size
  row[:duplicates] = seen.size - seen.uniq.size
  row[:cpu_us_per_trace] = ((row[:worker_cpu_s] + row[:master_cpu_s]) * 1e6 / want.size).round(1)
  row
end

def jobs_run(mode, agent)
  agent.clear
  script = <<~RUBY
    require "exporter"
    w = Exporter::Writer.new(transport: Exporter::Transport.new(url: #{agent.url.inspect}), flush_interval: 60)
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    #{JOBS}.times do |i|
      pid = fork { w.write([{ trace_id: i + 1, span_id: 1, name: "job", start: 1, duration: 1 }]); w.flush(timeout: 10); exit!(0) }
      Process.wait(pid)
    end
    puts((Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0) * 1000 / #{JOBS})
    Exporter::Sidecar.flush(timeout: 10)
  RUBY
  out = IO.popen({ "EXPORTER_SIDECAR" => mode }, [RbConfig.ruby, "-I#{File.join(__dir__, '..', 'lib')}", "-e", script], &:read)
  got = eventually(timeout: 20) { (t = agent.traces).size >= JOBS && t } rescue agent.traces # rubocop:disable Style/RescueModifier
  { mode: mode, ms_per_job: out.to_f.round(2), arrived: got.size }
end

agent = TestAgent.new.start
begin
  rows = %w[auto off].map { |m| server_run(m, agent) }
  puts "4-worker Puma, #{REQUESTS} requests, one worker SIGKILLed after a flushed 20-trace request"
  puts rows.first.keys.map { |k| k.to_s.rjust(17) }.join
  rows.each { |r| puts r.values.map { |v| v.to_s.rjust(17) }.join }
  puts
  puts "fork per job (fork, write, flush, exit!) x #{JOBS}"
  %w[auto off].each { |m| puts jobs_run(m, agent).inspect }
ensure
  agent.stop
end
