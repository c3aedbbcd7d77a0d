#!/usr/bin/env ruby
# frozen_string_literal: true

# Sidecar A/B, one command: `ruby bench/sidecar.rb`.
#
# The same 4-worker Puma server (Debian's puma, `--preload`, 2 threads per
# worker, the app of spec/fixtures/config.ru writing one trace of SPANS
# spans per request) with EXPORTER_SIDECAR=auto (the sidecar on) and =off,
# against a real ddapm-test-agent, for ROUNDS rounds alternating the
# modes. Per round and mode:
#
# 1. Steady load: REQUESTS requests over 8 keep-alive connections. Sampled
#    every 50 ms meanwhile: established TCP connections to the agent's port
#    per process (socket inodes of /proc/<pid>/fd matched against
#    /proc/<pid>/net/tcp{,6}; cross-checked with `ss -tnp` when present)
#    and threads per process (/proc/<pid>/task). Once the agent holds every
#    trace: PSS of each worker and of the master (/proc/<pid>/smaps_rollup)
#    and CPU (utime + stime of /proc/<pid>/stat, 10 ms ticks) used by the
#    workers and by the master since the load began, per span.
# 2. Kill under load: KILL_REQUESTS more requests; when a third of them
#    are answered, two workers are SIGKILLed (Puma starts new ones).
#    A trace counts as written when its request was answered 200; "lost"
#    = written and never received. Each loss is checked against the
#    documented window: served by a killed worker, answered at most one
#    flush interval (0.5 s, the app's Writer) plus a handover before the
#    kill.
# 3. Graceful stop (TERM): every trace of phase 1 must arrive exactly once.
#
# Then a fork-per-job loop (fork, write, flush, exit!) x JOBS, ms per job,
# with and without the sidecar. Prints a table of medians and writes it to
# bench/results/sidecar.md.
#   ROUNDS=3 REQUESTS=6000 SPANS=10 KILL_REQUESTS=1500 JOBS=100 (the defaults)
root = File.expand_path("..", __dir__)
$LOAD_PATH.unshift(File.join(root, "lib"), File.join(root, "spec", "support"))
require "exporter"
require "etc"
require "json"
require "net/http"
require "set"
require "test_agent"
require "process_helpers"
require "agent_sockets"

include ProcessHelpers # rubocop:disable Style/MixinUsage

ROUNDS = Integer(ENV.fetch("ROUNDS", "3"))
REQUESTS = Integer(ENV.fetch("REQUESTS", "6000"))
SPANS = Integer(ENV.fetch("SPANS", "10"))
KILL_REQUESTS = Integer(ENV.fetch("KILL_REQUESTS", "1500"))
JOBS = Integer(ENV.fetch("JOBS", "100"))
FIXTURES = File.join(root, "spec", "fixtures")
RESULTS = File.join(root, "bench", "results", "sidecar.md")
FLUSH_WINDOW = 0.5 + 0.5 # the app's flush interval, plus a handover and scheduling margin
SS = system("ss -V", out: File::NULL, err: File::NULL)

def proc_cpu(pid)
  f = File.read("/proc/#{pid}/stat").split(") ").last.split
  (f[11].to_i + f[12].to_i) / 100.0 # utime + stime, clock ticks (USER_HZ = 100)
end

def pss_kb(pid) = File.read("/proc/#{pid}/smaps_rollup")[/^Pss:\s+(\d+)/, 1].to_i
def threads(pid) = Dir.children("/proc/#{pid}/task").size
def children(pid) = File.read("/proc/#{pid}/task/#{pid}/children").split.map(&:to_i)

# pid => established connections to `port`, from `ss -tnp` (users:(("puma",pid=N,fd=M)...)).
def ss_connections(port)
  out = IO.popen(["ss", "-tnpH", "state", "established", "dport", "= :#{port}"], err: File::NULL, &:read)
  out.scan(/pid=(\d+)/).flatten.map(&:to_i).tally
end

def median(values)
  v = values.compact.sort
  return nil if v.empty?

  v.size.odd? ? v[v.size / 2] : ((v[v.size / 2 - 1] + v[v.size / 2]) / 2.0)
end

def get(port, path, id)
  Net::HTTP.start("127.0.0.1", port, read_timeout: 15) { |h| h.get(path, "X-Trace-Id" => id.to_s) }
end

# Requests `ids` over 8 connections; yields (id, pid, answered_at) for
# each 200. Connections that break (a killed worker) reconnect.
def load(port, ids)
  queue = Queue.new
  ids.each { |i| queue << i }
  8.times.map do
    Thread.new do
      until queue.empty?
        begin
          Net::HTTP.start("127.0.0.1", port, read_timeout: 15) do |h|
            while (id = (queue.pop(true) rescue nil)) # rubocop:disable Style/RescueModifier
              res = h.get("/", "X-Trace-Id" => id.to_s)
              yield id, res.body.to_i, monotonic if res.is_a?(Net::HTTPOK)
            end
          end
        rescue IOError, SystemCallError, Net::ReadTimeout
          next # the request in flight on a killed worker: not answered, not counted as written
        end
      end
    end
  end.each(&:join)
end

def wait_for_traces(agent, count, timeout: 60)
  eventually(timeout: timeout, interval: 0.5) { (t = agent.traces).size >= count && t }
rescue RuntimeError
  agent.traces
end

def server_run(mode, agent)
  agent.clear
  port = TestAgent.free_port
  agent_port = URI(agent.url).port
  env = { "EXPORTER_AGENT_URL" => agent.url, "RUBYOPT" => "-I#{File.join(__dir__, '..', 'lib')}",
          "EXPORTER_SIDECAR" => mode, "EXPORTER_SPANS_PER_TRACE" => SPANS.to_s }
  log = File.join(Dir.tmpdir, "exporter-bench-sidecar-#{mode}.log")
  pid = Process.spawn(env, "puma", "-w", "4", "-t", "2:2", "--preload", "-b", "tcp://127.0.0.1:#{port}",
                      "config.ru", chdir: FIXTURES, out: log, err: log, pgroup: true)
  eventually(timeout: 30, interval: 0.1) { get(port, "/", 1).is_a?(Net::HTTPOK) rescue false } # rubocop:disable Style/RescueModifier
  workers = eventually(timeout: 10) { (c = children(pid)).size == 4 && c }
  procs = [pid] + workers
  # Phase 1: steady load.
  cpu0 = procs.to_h { |p| [p, proc_cpu(p)] }
  conns = Hash.new(0)
  ss_conns = Hash.new(0)
  thread_max = Hash.new(0)
  running = true
  sampler = Thread.new do
    while running
      procs.each do |p|
        conns[p] = [conns[p], AgentSockets.connections(p, agent_port)].max
        thread_max[p] = [thread_max[p], threads(p)].max
      end
      ss_connections(agent_port).each { |p, n| ss_conns[p] = [ss_conns[p], n].max } if SS
      sleep 0.05
    end
  end
  t0 = monotonic
  load(port, (2..REQUESTS + 1).to_a) { nil }
  load_s = monotonic - t0
  wait_for_traces(agent, REQUESTS + 1)
  running = false # sampled until delivered: a connection opens at the first send
  sampler.join
  cpu = procs.to_h { |p| [p, proc_cpu(p) - cpu0[p]] }
  spans = REQUESTS * SPANS
  row = {
    mode: mode,
    requests_per_s: (REQUESTS / load_s).round,
    worker_agent_conns: workers.map { |w| conns[w] }.max,
    master_agent_conns: conns[pid],
    ss_worker_conns: SS ? workers.map { |w| ss_conns[w] }.max : nil,
    ss_master_conns: SS ? ss_conns[pid] : nil,
    worker_threads: workers.map { |w| thread_max[w] }.max,
    master_threads: thread_max[pid],
    worker_pss_kb: workers.sum { |w| pss_kb(w) } / workers.size,
    master_pss_kb: pss_kb(pid),
    worker_cpu_s: workers.sum { |w| cpu[w] }.round(2),
    master_cpu_s: cpu[pid].round(2),
    worker_us_per_span: (workers.sum { |w| cpu[w] } * 1e6 / spans).round(1),
    master_us_per_span: (cpu[pid] * 1e6 / spans).round(1)
  }
  row[:total_us_per_span] = (row[:worker_us_per_span] + row[:master_us_per_span]).round(1)
  # Phase 2: two workers SIGKILLed under load.
  base = 100_000
  answered = Queue.new
  killed = []
  kill_at = nil
  lock = Mutex.new
  count = 0
  load(port, (base...base + KILL_REQUESTS).to_a) do |id, served_by, at|
    answered << [id, served_by, at]
    next unless lock.synchronize { (count += 1) == KILL_REQUESTS / 3 }

    kill_at = monotonic
    killed = workers.first(2)
    killed.each { |w| Process.kill(:KILL, w) rescue nil } # rubocop:disable Style/RescueModifier
  end
  written = Array.new(answered.size) { answered.pop }
  # Phase 3: graceful stop.
  Process.kill(:TERM, pid)
  wait_bounded(pid, timeout: 60)
  got = wait_for_traces(agent, REQUESTS + 1 + written.size, timeout: 30)
  seen = got.map { |t| t.first["trace_id"] }
  steady = (1..REQUESTS + 1).to_a
  row[:steady_lost] = (steady - seen).size
  row[:duplicates] = seen.size - seen.uniq.size
  seen_set = seen.to_set
  lost = written.reject { |id, _, _| seen_set.include?(id) }
  row[:kill_written] = written.size
  row[:kill_lost] = lost.size
  row[:kill_lost_in_window] = lost.count { |_, by, at| killed.include?(by) && at >= kill_at - FLUSH_WINDOW }
  row
ensure
  kill_hard(pid) if pid && File.exist?("/proc/#{pid}")
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
  got = wait_for_traces(agent, JOBS, timeout: 20)
  { mode: mode, ms_per_job: out.to_f.round(2), arrived: got.map { |t| t.first["trace_id"] }.uniq.size }
end

MODES = %w[auto off].freeze
agent = TestAgent.new.start
begin
  runs = Hash.new { |h, k| h[k] = [] }
  ROUNDS.times do |r|
    MODES.each do |m|
      row = server_run(m, agent)
      warn "round #{r + 1} #{m}: #{row.inspect}"
      runs[m] << row
    end
  end
  jobs = MODES.to_h { |m| [m, Array.new(ROUNDS) { jobs_run(m, agent) }] }
  keys = runs["auto"].first.keys - [:mode]
  lines = []
  lines << "# Sidecar A/B (bench/sidecar.rb)"
  lines << ""
  lines << "4-worker Puma #{`puma --version`.strip.split.last} (`--preload`, 2 threads), #{REQUESTS} requests of one " \
           "#{SPANS}-span trace (#{REQUESTS * SPANS} spans) per run, ddapm-test-agent; median of #{ROUNDS} rounds " \
           "per mode (modes alternate). #{Etc.nprocessors} CPUs, shared. `auto` = sidecar on, `off` = direct."
  lines << ""
  lines << "| metric | #{MODES.map { |m| "sidecar #{m}" }.join(' | ')} | rounds (on / off) |"
  lines << "|---|#{MODES.map { '---:' }.join('|')}|---|"
  keys.each do |k|
    meds = MODES.map { |m| median(runs[m].map { |row| row[k] }) }
    all = MODES.map { |m| runs[m].map { |row| row[k] }.join(" ") }.join(" / ")
    lines << "| #{k} | #{meds.join(' | ')} | #{all} |"
  end
  jobs_meds = MODES.map { |m| median(jobs[m].map { |j| j[:ms_per_job] }) }
  arrived = MODES.map { |m| jobs[m].map { |j| j[:arrived] }.min }
  lines << "| fork per job: ms per job (fork, write, flush, exit!) x #{JOBS} | #{jobs_meds.join(' | ')} | " \
           "#{MODES.map { |m| jobs[m].map { |j| j[:ms_per_job] }.join(' ') }.join(' / ')} |"
  lines << "| fork per job: traces arrived (min over rounds, of #{JOBS}) | #{arrived.join(' | ')} | |"
  table = lines.join("\n")
  puts table
  unless ENV["NO_RESULTS"]
    # Notes written by hand below the table ("## Notes" on) are kept.
    notes = File.exist?(RESULTS) ? File.read(RESULTS)[/^## Notes.*/m] : nil
    File.write(RESULTS, [table, notes].compact.join("\n\n") + "\n")
  end
ensure
  agent.stop
end
