# frozen_string_literal: true

# One measurement in a fresh process (so peak RSS is its own). Prints one
# JSON line. Run by bench/bench.rb:
#   ruby bench/run_one.rb MODE IMPL URL [IDS]
# IDS: the workload's id shape, ddtrace | random64 (default; see workload.rb)
# MODE: alone | contention | paced | kill | fork_system | fork_fork | idle_rss
# (fork_worker: one side of fork_system / fork_fork, spawned by it)
# IMPL: baseline | sync | writer | none | gem | ab (fork_*: without, then with the gem)
require "json"
require "rbconfig"
require_relative "workload"

MODE, IMPL, URL = ARGV
IDS = ARGV.fetch(3, "random64")
SECONDS = Float(ENV.fetch("BENCH_SECONDS", "1.5"))
PACE_SPANS_PER_S = 50_000
WARM_UP_TRACES = 20

def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
def thread_cpu = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)
def process_cpu = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)

def status_kb(field)
  File.read("/proc/self/status")[/^#{field}:\s+(\d+)/, 1].to_i
end

# CPU seconds of every Ruby thread but `except` (from /proc: a Ruby helper
# thread would hide its cost from the calling-thread clock).
def ruby_threads_cpu(except: nil)
  hz = 100.0
  Thread.list.reject { |t| t == except }.sum do |t|
    tid = t.native_thread_id
    fields = File.read("/proc/self/task/#{tid}/stat").split(") ").last.split
    (fields[11].to_i + fields[12].to_i) / hz
  rescue Errno::ENOENT, NoMethodError
    0
  end
end

def load_impl(impl = IMPL)
  case impl
  when "baseline"
    require_relative "baseline"
    BaselineExporter.new(URL)
  when "sync", "writer", "gem"
    $LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
    require "exporter"
    t = Exporter::Transport.new(url: URL)
    impl == "writer" ? Exporter::Writer.new(transport: t, buffer_size: 5_000, flush_interval: 0.05) : t
  end
end

TRACES = Workload.traces(1_000, IDS)
BATCHES = TRACES.each_slice(Workload::TRACES_PER_REQUEST).to_a

# Exports flat out until `until_t`; returns traces handed over.
def export_flat_out(impl, until_t)
  n = 0
  if writer?(impl)
    while now < until_t
      impl.write(TRACES[n % TRACES.size])
      n += 1
    end
  else
    while now < until_t
      impl.send_traces(BATCHES[(n / Workload::TRACES_PER_REQUEST) % BATCHES.size])
      n += Workload::TRACES_PER_REQUEST
    end
  end
  n
end

# Spans the implementation got accepted: for the writer, what it sent
# after a final flush (its wall time includes that flush).
def delivered(impl, handed)
  return [handed, 0] unless writer?(impl)

  impl.flush(timeout: 30)
  s = impl.stats
  [s[:sent] - WARM_UP_TRACES, s[:written] - s[:sent]]
end

def spinner
  count = [0]
  th = Thread.new { loop { count[0] += 1 } }
  [th, count]
end

# Measures the spinner's solo speed, then runs the block beside it. The
# block returns what it measured and calls `mark` when the contended part
# ends (before waiting for a final flush, during which the spinner runs
# alone); adds the spinner's share of its solo speed over that part.
def with_spinner(impl)
  warm_up(impl)
  solo = spin_rate(1.0)
  th, count = spinner
  sleep 0.1
  c0 = count[0]
  w0 = now
  ended = nil
  result = yield(w0, -> { ended = [now, count[0]] })
  th.kill
  t1, c1 = ended || [now, count[0]]
  result.merge(spinner_share: ((c1 - c0) / (t1 - w0)) / solo)
end

def spin_rate(seconds)
  th, count = spinner
  t0 = now
  c0 = count[0]
  sleep seconds
  rate = (count[0] - c0) / (now - t0)
  th.kill
  th.join
  rate
end

def writer?(impl) = defined?(Exporter::Writer) && impl.is_a?(Exporter::Writer)

# Writes at PACE_SPANS_PER_S: whenever the thread runs, it writes every
# trace due by now (with a spinning thread it gets the GVL in bursts).
def paced(impl, w0, mark)
  traces_per_s = PACE_SPANS_PER_S / Workload::SPANS_PER_TRACE
  written = 0
  while (elapsed = now - w0) < SECONDS * 2
    due = (elapsed * traces_per_s).to_i
    while written < due
      impl.write(TRACES[written % TRACES.size])
      written += 1
    end
    sleep 0.001
  end
  paced_wall = now - w0
  mark.()
  flushed = impl.flush(timeout: 30)
  s = impl.stats
  sent = s[:sent] - WARM_UP_TRACES
  { spans_per_s: sent * Workload::SPANS_PER_TRACE / paced_wall,
    written: written, sent: sent, dropped: s[:dropped], failed: s[:failed],
    unflushed: s[:queued], flushed: flushed }
end

def warm_up(impl)
  if writer?(impl)
    WARM_UP_TRACES.times { |i| impl.write(TRACES[i]) }
    impl.flush(timeout: 10)
  else
    2.times { |i| impl.send_traces(BATCHES[i]) }
  end
end

result =
  case MODE
  when "alone"
    impl = load_impl
    warm_up(impl)
    GC.start
    w0 = now
    tc0 = thread_cpu
    pc0 = process_cpu
    handed = export_flat_out(impl, w0 + SECONDS)
    tc1 = thread_cpu
    traces, lost = delivered(impl, handed)
    wall = now - w0
    pc1 = process_cpu
    spans = traces * Workload::SPANS_PER_TRACE
    handed_spans = handed * Workload::SPANS_PER_TRACE
    { spans_per_s: spans / wall, thread_cpu_us_per_span: (tc1 - tc0) * 1e6 / handed_spans,
      process_cpu_us_per_span: (pc1 - pc0) * 1e6 / spans, lost_traces: lost,
      ruby_threads_cpu_s: ruby_threads_cpu, peak_rss_mb: status_kb("VmHWM") / 1024.0 }
  when "fresh"
    # As in an app: each trace is built just before it is exported (its
    # objects are hot in cache). Only the export call is timed.
    impl = load_impl
    warm_up(impl)
    spent = 0.0
    spans = 0
    n = 0
    until_t = now + SECONDS
    while now < until_t
      if writer?(impl)
        batch = Workload.trace(n, IDS)
        c0 = thread_cpu
        impl.write(batch)
      else
        batch = Array.new(Workload::TRACES_PER_REQUEST) { |i| Workload.trace(n + i, IDS) }
        c0 = thread_cpu
        impl.send_traces(batch)
      end
      spent += thread_cpu - c0
      count = writer?(impl) ? 1 : Workload::TRACES_PER_REQUEST
      n += count
      spans += count * Workload::SPANS_PER_TRACE
    end
    delivered(impl, n)
    { thread_cpu_us_per_span: spent * 1e6 / spans }
  when "contention"
    impl = load_impl
    with_spinner(impl) do |w0, mark|
      handed = export_flat_out(impl, w0 + SECONDS)
      mark.()
      traces, lost = delivered(impl, handed)
      { spans_per_s: traces * Workload::SPANS_PER_TRACE / (now - w0), lost_traces: lost,
        peak_rss_mb: status_kb("VmHWM") / 1024.0 }
    end
  when "paced"
    impl = load_impl
    with_spinner(impl) { |w0, mark| paced(impl, w0, mark) }
  when "kill"
    impl = load_impl
    samples = Array.new(20) do
      th = Thread.new { impl.send_traces(BATCHES[0]) }
      sleep 0.05
      t0 = now
      th.kill
      th.join
      (now - t0) * 1e3
    end
    { kill_ms: samples.sort[samples.size / 2], kill_ms_max: samples.max }
  when "fork_system", "fork_fork"
    # A/B between live processes without the gem and with it loaded and
    # its runtime running (as in an app), timed in alternating blocks so
    # that drifts of this noisy machine hit both alike. Four workers,
    # spawned none, gem, gem, none: the first spawned measured up to 35%
    # slower here, whichever it was.
    call = MODE.delete_prefix("fork_")
    workers = %w[none gem gem none].map do |impl|
      io = IO.popen([RbConfig.ruby, __FILE__, "fork_worker", impl, URL, IDS, call], "r+")
      io.gets # ready
      [impl, io]
    end
    block = call == "system" ? 25 : 10
    times = Hash.new { |h, k| h[k] = [] }
    20.times do |i|
      # Each worker goes first in some of the blocks.
      workers.rotate(i).each do |impl, io|
        io.puts(block)
        times[impl] << Float(io.gets)
      end
    end
    hooks_run = workers.map do |impl, io|
      io.close_write
      [impl, Float(io.gets)]
    end
    workers.each { |_, io| io.close } # waits for the worker, which exits on EOF
    med = ->(xs) { xs.sort[xs.size / 2] }
    { none_us: med.(times["none"]), gem_us: med.(times["gem"]),
      gem_to_none: med.(times["gem"]) / med.(times["none"]),
      hooks_run_per_call: hooks_run.select { |impl, _| impl == "gem" }.sum { |_, h| h } / 2 }
  when "fork_worker"
    # One side of the fork A/B: times blocks of calls on request (stdin:
    # a count per line; stdout: µs per call), then prints how many times
    # the gem's :before hook ran per call.
    call = ARGV[4] == "system" ? -> { system("true") } : -> { Process.wait(fork { exit!(0) }) }
    hooks_run = 0
    if IMPL == "gem"
      t = load_impl("sync")
      t.send_traces(BATCHES[0])
      Exporter::AtFork.at_fork(:before) { hooks_run += 1 }
    end
    5.times { call.() }
    calls = 5
    $stdout.sync = true
    puts "ready"
    while (line = $stdin.gets)
      n = Integer(line)
      t0 = now
      n.times { call.() }
      puts((now - t0) * 1e6 / n)
      calls += n
    end
    puts hooks_run.fdiv(calls)
    exit!(0)
  when "record"
    $LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
    require "exporter"
    e = Exporter::Exposures.new(url: URL, flush_interval: 0.2)
    attrs = { "plan" => "pro", "country" => "fr", "age" => 30 }
    per_call = lambda do |n, &blk|
      t0 = thread_cpu
      n.times(&blk)
      (thread_cpu - t0) * 1e6 / n
    end
    n = 50_000
    # Made before the timed loop, as bench/flag_evaluations.rb's keys:
    # only #record is timed, not building its argument.
    subjects = Array.new(n) { |i| "user-#{i}" }
    fresh = per_call.(n) do |i|
      e.record(flag: "checkout", allocation: "rollout", variant: "on", subject_id: subjects[i],
               subject_attributes: attrs)
    end
    dedup = per_call.(n) do
      e.record(flag: "checkout", allocation: "rollout", variant: "on", subject_id: "user-1", subject_attributes: attrs)
    end
    e.close(timeout: 30)
    { record_us: fresh, record_dedup_us: dedup, dropped: e.stats[:dropped] }
  when "idle_rss"
    require "msgpack"
    require "net/http"
    if IMPL == "gem"
      t = load_impl
      t.send_traces(BATCHES[0]) # extension loaded, runtime started
    end
    GC.start
    sleep 0.2
    { rss_mb: status_kb("VmRSS") / 1024.0 }
  else
    abort "unknown mode #{MODE}"
  end

puts JSON.generate(result)
$stdout.flush
exit!(0) # skip at_exit work: it is not part of what was measured
