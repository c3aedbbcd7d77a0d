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
#    /proc/<pid>/net/tcp{,6}; cross-checked with `ss -tnp` when present),
#    threads per process (/proc/<pid>/task), and the CPU of every thread
#    (/proc/<pid>/task/<tid>/schedstat, ns). Once the agent holds every
#    trace: PSS of each worker and of the master (/proc/<pid>/smaps_rollup)
#    and CPU per span since the load began:
#    - *_rt_us_per_span: the exporter's native runtime threads (comm
#      `exporter-rt*`: flusher, encoder, handover, listener, HTTP) in the
#      workers and in the master: the exporter's own background work,
#      apart from Puma's;
#    - worker_ruby_us_per_span: every other thread of the workers (Puma,
#      the app, and the calling-thread cost of Writer#write, measured
#      apart below);
#    - *_process_us_per_span: whole processes (utime + stime, 10 ms
#      ticks), dominated by Puma: the figure this script used to report.
# 2. Kill under load: KILL_REQUESTS more requests; when a third of them
#    are answered, two workers are SIGKILLed (Puma starts new ones).
#    A trace counts as written when its request was answered 200; "lost"
#    = written and never received. Each loss is checked against the
#    documented window: served by a killed worker, answered at most one
#    flush interval (0.5 s, the app's Writer) plus a handover before the
#    kill.
# 3. Graceful stop (TERM): every trace of phase 1 must arrive exactly once.
#
# Then the exporter alone, without Puma (see MICRO below): the calling
# thread's CPU in Writer#write, and the exporter-rt threads of forked
# children and of their parent (the listener with the sidecar on), per
# span, MICRO_ROUNDS rounds; each round runs both modes back to back (the
# order alternates from round to round), and the per-round differences
# (on − off) are reported next to the medians: pairs that ran a minute
# apart share the machine's load, so their difference is steadier than
# two medians. Then a fork-per-job loop (fork, write, flush, exit!) x
# JOBS, ms per job. Modes alternate in every part. Prints tables of
# medians (with every round) and writes them to bench/results/sidecar.md
# (or OUT), keeping its hand-written Notes.
#   ROUNDS=3 REQUESTS=20000 SPANS=10 KILL_REQUESTS=1500 JOBS=100
#   MICRO_ROUNDS=5 MICRO_CHILDREN=4 MICRO_TRACES=6000 MICRO_RATE=250 (the defaults)
#   MICRO_ONLY=1: only the micro and fork-per-job parts (no Puma, ~6 min);
#     their tables are printed, and written only to OUT if set (never to
#     bench/results/sidecar.md, whose Puma table they would drop).
#   NO_RESULTS=1: print only.
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
REQUESTS = Integer(ENV.fetch("REQUESTS", "20000"))
SPANS = Integer(ENV.fetch("SPANS", "10"))
KILL_REQUESTS = Integer(ENV.fetch("KILL_REQUESTS", "1500"))
JOBS = Integer(ENV.fetch("JOBS", "100"))
MICRO_CHILDREN = Integer(ENV.fetch("MICRO_CHILDREN", "4"))
MICRO_TRACES = Integer(ENV.fetch("MICRO_TRACES", "6000"))
MICRO_RATE = Integer(ENV.fetch("MICRO_RATE", "250"))
MICRO_ROUNDS = Integer(ENV.fetch("MICRO_ROUNDS", "5"))
MICRO_ONLY = !ENV.fetch("MICRO_ONLY", "").empty? && ENV["MICRO_ONLY"] != "0"
LIB = File.join(root, "lib")
FIXTURES = File.join(root, "spec", "fixtures")
RESULTS = ENV.fetch("OUT") { MICRO_ONLY ? nil : File.join(root, "bench", "results", "sidecar.md") }
FLUSH_WINDOW = 0.5 + 0.5 # the app's flush interval, plus a handover and scheduling margin
SS = system("ss -V", out: File::NULL, err: File::NULL)

def proc_cpu(pid)
  f = File.read("/proc/#{pid}/stat").split(") ").last.split
  (f[11].to_i + f[12].to_i) / 100.0 # utime + stime, clock ticks (USER_HZ = 100)
end

# tid => [comm, ns on CPU] for every thread of `pid` (schedstat: ns, not
# 10 ms ticks).
def thread_times(pid)
  Dir.children("/proc/#{pid}/task").each_with_object({}) do |tid, h|
    d = "/proc/#{pid}/task/#{tid}"
    h[tid.to_i] = [File.read("#{d}/comm").strip, File.read("#{d}/schedstat").split.first.to_i]
  rescue Errno::ENOENT, Errno::ESRCH
    next
  end
rescue Errno::ENOENT, Errno::ESRCH
  {}
end

# CPU per thread of some processes since `start`, split into the exporter's
# native runtime threads (comm `exporter-rt*`: the flusher, the listener,
# the threads block_in_place brings in) and the rest (Ruby's, Puma's).
# Sampled often: a thread that exits keeps what it used up to its last
# sample (tokio lets idle blocking threads go after 10 s).
class ThreadCpu
  RT = "exporter-rt"

  def initialize(pids)
    @lock = Mutex.new
    @base = {}
    @last = {}
    @pids = pids
    pids.each do |p|
      thread_times(p).each do |tid, (comm, ns)|
        @base[[p, tid]] = ns
        @last[[p, tid]] = [comm, ns]
      end
    end
  end

  def sample
    @pids.each do |p|
      now = thread_times(p)
      @lock.synchronize { now.each { |tid, v| @last[[p, tid]] = v } }
    end
  end

  # { rt: seconds, other: seconds, rt_threads: n } of `pid`.
  def of(pid)
    @lock.synchronize do
      @last.select { |(p, _), _| p == pid }.each_with_object({ rt: 0.0, other: 0.0, rt_threads: 0 }) do |(key, (comm, ns)), h|
        s = (ns - @base.fetch(key, 0)) / 1e9
        if comm.start_with?(RT)
          h[:rt] += s
          h[:rt_threads] += 1
        else
          h[:other] += s
        end
      end
    end
  end
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
  tcpu = ThreadCpu.new(procs)
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
      tcpu.sample
      sleep 0.05
    end
  end
  t0 = monotonic
  load(port, (2..REQUESTS + 1).to_a) { nil }
  load_s = monotonic - t0
  wait_for_traces(agent, REQUESTS + 1)
  running = false # sampled until delivered: a connection opens at the first send
  sampler.join
  tcpu.sample
  cpu = procs.to_h { |p| [p, proc_cpu(p) - cpu0[p]] }
  tc = procs.to_h { |p| [p, tcpu.of(p)] }
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
    # The exporter's native threads (schedstat, ns), per span.
    worker_rt_us_per_span: (workers.sum { |w| tc[w][:rt] } * 1e6 / spans).round(2),
    master_rt_us_per_span: (tc[pid][:rt] * 1e6 / spans).round(2),
    rt_total_us_per_span: ((workers.sum { |w| tc[w][:rt] } + tc[pid][:rt]) * 1e6 / spans).round(2),
    worker_rt_threads_seen: workers.map { |w| tc[w][:rt_threads] }.max,
    # Every other thread of the workers (Puma, the app, Writer#write).
    worker_ruby_us_per_span: (workers.sum { |w| tc[w][:other] } * 1e6 / spans).round(1),
    # Whole processes (utime + stime, 10 ms ticks): the old figure.
    worker_process_us_per_span: (workers.sum { |w| cpu[w] } * 1e6 / spans).round(1),
    master_process_us_per_span: (cpu[pid] * 1e6 / spans).round(1)
  }
  row[:process_total_us_per_span] = (row[:worker_process_us_per_span] + row[:master_process_us_per_span]).round(1)
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

# The exporter alone, no Puma and no HTTP load: a parent with a Writer
# (in `auto`, the listener) forks CHILDREN children that each write
# MICRO_TRACES traces of the app's shape (SPANS spans) paced at
# MICRO_RATE traces/s (about a Puma worker's share in phase 1), then flush.
# Measured in each child: the calling thread's CPU inside Writer#write
# (CLOCK_THREAD_CPUTIME_ID; identical code in both modes: write only
# converts and queues), and its exporter-rt threads; in the parent, its
# exporter-rt threads until the listener has sent everything.
MICRO = <<~'RUBY'
  require "exporter"
  require "json"
  url = ARGV[0]
  children, traces, rate, spans = ARGV[1..].map(&:to_i)
  def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  def thread_cpu = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)
  # tid => ns of this process's exporter-rt threads.
  def rt_times
    Dir.children("/proc/self/task").each_with_object({}) do |tid, h|
      d = "/proc/self/task/#{tid}"
      h[tid] = File.read("#{d}/schedstat").split.first.to_i if File.read("#{d}/comm").start_with?("exporter-rt")
    rescue Errno::ENOENT
      next
    end
  end
  # Keeps the last value of every exporter-rt thread (one that exits keeps
  # what it had at its last sample).
  def rt_sampler
    seen = {}
    base = rt_times
    t = Thread.new { loop { seen.merge!(rt_times); sleep 0.2 } }
    lambda do
      t.kill
      t.join
      seen.merge!(rt_times)
      [seen.sum { |tid, ns| ns - base.fetch(tid, 0) } / 1e9, seen.size]
    end
  end
  # (the sampler is a Ruby thread: its CPU is not counted as the exporter's)
  W = Exporter::Writer.new(transport: Exporter::Transport.new(url: url, service: "forking-app"), flush_interval: 0.5)
  def trace(id, spans)
    start = Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)
    root = { trace_id: id, span_id: id, name: "rack.request", resource: "GET /", type: "web",
             start: start, duration: 5_000_000, meta: { "worker.pid" => Process.pid.to_s } }
    kids = (1...spans).map do |i|
      { trace_id: id, span_id: (id << 8) + i, parent_id: id, name: "db.query", resource: "SELECT #{i}",
        type: "sql", start: start + i, duration: 1_000, meta: { "db.system" => "postgresql" } }
    end
    [root, *kids]
  end
  go_r, go_w = IO.pipe
  res_r, res_w = IO.pipe
  pids = Array.new(children) do |c|
    fork do
      go_w.close
      res_r.close
      stop = rt_sampler
      go_r.read(1)
      cpu = 0.0
      t0 = now
      traces.times do |i|
        tr = trace((c + 1) * 10_000_000 + i, spans)
        a = thread_cpu
        W.write(tr)
        cpu += thread_cpu - a
        wait = t0 + (i + 1).fdiv(rate) - now
        sleep wait if wait.positive?
      end
      ok = W.flush(timeout: 30)
      rt, n = stop.call
      res_w.write("#{JSON.generate(write_s: cpu, rt_s: rt, rt_threads: n, flushed: ok, stats: W.stats)}\n")
      exit!(0)
    end
  end
  go_r.close
  res_w.close
  stop = rt_sampler
  go_w.write("x" * children)
  go_w.close
  kids = res_r.read.lines.map { |l| JSON.parse(l) }
  pids.each { |pid| Process.wait(pid) }
  sent = Exporter::Sidecar.flush(timeout: 30)
  rt, n = stop.call
  puts JSON.generate(children: kids, parent_rt_s: rt, parent_rt_threads: n, parent_sent: sent,
                     status: Exporter::Sidecar.status)
RUBY

def load_1m = File.read("/proc/loadavg").split.first.to_f

def micro_run(mode, agent)
  agent.clear
  load0 = load_1m
  argv = [RbConfig.ruby, "-I#{LIB}", "-e", MICRO, agent.url,
          MICRO_CHILDREN.to_s, MICRO_TRACES.to_s, MICRO_RATE.to_s, SPANS.to_s]
  out, err, status = capture_bounded({ "EXPORTER_SIDECAR" => mode }, *argv, timeout: 300)
  raise "micro #{mode} failed: #{status.inspect} #{err}" unless status.success?

  r = JSON.parse(out.lines.last)
  kids = r["children"]
  spans = MICRO_CHILDREN * MICRO_TRACES * SPANS
  got = wait_for_traces(agent, MICRO_CHILDREN * MICRO_TRACES, timeout: 30)
  write = kids.sum { |k| k["write_s"] } * 1e6 / spans
  child_rt = kids.sum { |k| k["rt_s"] } * 1e6 / spans
  parent_rt = r["parent_rt_s"] * 1e6 / spans
  { mode: mode, write_us_per_span: write.round(2), child_rt_us_per_span: child_rt.round(2),
    parent_rt_us_per_span: parent_rt.round(2), rt_total_us_per_span: (child_rt + parent_rt).round(2),
    exporter_total_us_per_span: (write + child_rt + parent_rt).round(2),
    child_rt_threads: kids.map { |k| k["rt_threads"] }.max, parent_rt_threads: r["parent_rt_threads"],
    arrived: got.map { |t| t.first["trace_id"] }.uniq.size, load_1m: [load0, load_1m].max }
end

# The micro rows whose per-round difference (on − off) is reported.
MICRO_DIFFS = %i[write_us_per_span child_rt_us_per_span parent_rt_us_per_span rt_total_us_per_span
                 exporter_total_us_per_span].freeze

MODES = %w[auto off].freeze

# The head of a table with a column per mode and one with every round.
def mode_table_head(lines, first)
  lines << "| #{first} | #{MODES.map { |m| "sidecar #{m}" }.join(' | ')} | rounds (on / off) |"
  lines << "|---|#{MODES.map { '---:' }.join('|')}|---|"
end

def table_rows(lines, runs, keys)
  keys.each do |k|
    meds = MODES.map { |m| median(runs[m].map { |row| row[k] }) }
    all = MODES.map { |m| runs[m].map { |row| row[k] }.join(" ") }.join(" / ")
    lines << "| #{k} | #{meds.join(' | ')} | #{all} |"
  end
end

agent = TestAgent.new.start
begin
  runs = Hash.new { |h, k| h[k] = [] }
  unless MICRO_ONLY
    ROUNDS.times do |r|
      MODES.each do |m|
        row = server_run(m, agent)
        warn "round #{r + 1} #{m}: #{row.inspect}"
        runs[m] << row
      end
    end
  end
  micro = Hash.new { |h, k| h[k] = [] }
  MICRO_ROUNDS.times do |r|
    # Both modes back to back; which goes first alternates.
    (r.even? ? MODES : MODES.reverse).each do |m|
      row = micro_run(m, agent)
      warn "micro round #{r + 1} #{m}: #{row.inspect}"
      micro[m] << row
    end
  end
  jobs = MODES.to_h { |m| [m, Array.new(ROUNDS) { jobs_run(m, agent) }] }
  lines = []
  lines << "# Sidecar A/B (bench/sidecar.rb)"
  lines << ""
  unless MICRO_ONLY
    lines << "4-worker Puma #{`puma --version`.strip.split.last} (`--preload`, 2 threads), #{REQUESTS} requests of one " \
             "#{SPANS}-span trace (#{REQUESTS * SPANS} spans) per run, ddapm-test-agent; median of #{ROUNDS} rounds " \
             "per mode (modes alternate). #{Etc.nprocessors} CPUs, shared. `auto` = sidecar on, `off` = direct."
    lines << ""
    mode_table_head(lines, "metric")
    table_rows(lines, runs, runs["auto"].first.keys - [:mode])
    lines << ""
  end
  lines << "Exporter alone (no Puma): #{MICRO_CHILDREN} forked children x #{MICRO_TRACES} traces of #{SPANS} spans " \
           "(#{MICRO_CHILDREN * MICRO_TRACES * SPANS} spans) at #{MICRO_RATE} traces/s each; median of #{MICRO_ROUNDS} " \
           "rounds per mode, each round both modes back to back (order alternating). " \
           "#{Etc.nprocessors} CPUs, shared; `load_1m`: the 1-minute load average (the higher of start and end of the run)."
  lines << ""
  mode_table_head(lines, "micro: µs per span")
  table_rows(lines, micro, micro["auto"].first.keys - [:mode])
  lines << ""
  lines << "| micro: on − off, µs per span | median of the rounds' differences | per round | rounds lower with the sidecar |"
  lines << "|---|---:|---|---:|"
  MICRO_DIFFS.each do |k|
    d = micro["auto"].zip(micro["off"]).map { |on, off| (on[k] - off[k]).round(2) }
    lines << "| #{k} | #{median(d)&.round(2)} | #{d.join(' ')} | #{d.count(&:negative?)} of #{d.size} |"
  end
  lines << ""
  mode_table_head(lines, "fork per job")
  jobs_meds = MODES.map { |m| median(jobs[m].map { |j| j[:ms_per_job] }) }
  arrived = MODES.map { |m| jobs[m].map { |j| j[:arrived] }.min }
  lines << "| fork per job: ms per job (fork, write, flush, exit!) x #{JOBS} | #{jobs_meds.join(' | ')} | " \
           "#{MODES.map { |m| jobs[m].map { |j| j[:ms_per_job] }.join(' ') }.join(' / ')} |"
  lines << "| fork per job: traces arrived (min over rounds, of #{JOBS}) | #{arrived.join(' | ')} | |"
  table = lines.join("\n")
  puts table
  if RESULTS && !ENV["NO_RESULTS"]
    # Notes written by hand below the table ("## Notes" on) are kept.
    notes = File.exist?(RESULTS) ? File.read(RESULTS)[/^## Notes.*/m] : nil
    File.write(RESULTS, [table, notes].compact.join("\n\n") + "\n")
  end
ensure
  agent.stop
end
