# frozen_string_literal: true

# The benchmark suite (bin/bench, rake bench). Builds what it needs, starts
# the project's own HTTP sink, runs every benchmark for several rounds in
# fresh processes, on every id shape of the workload side by side
# (bench/workload.rb: ddtrace, random64), prints medians with min..max and
# ratios against the pure-Ruby baseline measured in the same run on the
# same ids, checks the targets (PASS / FAIL), and writes
# bench/results/latest.md and latest.png.
require "json"
require "open3"
require "rbconfig"

ROOT = File.expand_path("..", __dir__)
BIN = File.join(ROOT, "target", "release", "exporter-bench")
RESULTS = File.join(ROOT, "bench", "results")
ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "5"))
RUBY = RbConfig.ruby
require_relative "workload"
SHAPES = Workload::SHAPES

def sh!(*cmd, **opts)
  system(*cmd, chdir: ROOT, exception: true, **opts)
end

def start_sink(*flags)
  out, pid = nil
  r, w = IO.pipe
  pid = Process.spawn(BIN, "sink", "--port", "0", *flags, out: w)
  w.close
  out = r.gets.to_s
  r.close
  port = out[/listening (\d+)/, 1] or abort("sink did not start")
  [pid, "http://127.0.0.1:#{port}"]
end

def stop(pid)
  Process.kill(:TERM, pid)
  Process.wait(pid)
rescue Errno::ESRCH, Errno::ECHILD
  nil
end

def run_one(mode, impl, url, ids = "random64")
  out, err, st = Open3.capture3(RUBY, File.join(ROOT, "bench", "run_one.rb"), mode, impl, url.to_s, ids)
  raise "run_one #{mode} #{impl} failed: #{err}" unless st.success?

  JSON.parse(out.lines.last, symbolize_names: true)
end

def run_bin(cmd, url, seconds, ids = "random64")
  out, err, st = Open3.capture3(BIN, cmd, "--url", url, "--seconds", seconds.to_s, "--ids", ids)
  raise "exporter-bench #{cmd} failed: #{err}" unless st.success?

  JSON.parse(out, symbolize_names: true)
end

def median(xs) = xs.sort[xs.size / 2]

# name => { metric => [values per round] }
samples = Hash.new { |h, k| h[k] = Hash.new { |hh, kk| hh[kk] = [] } }
record = ->(name, result) { result.each { |k, v| samples[name][k] << v if v.is_a?(Numeric) } }

puts "bench: building (release)"
sh!("rake", "compile", out: File::NULL)
sh!("cargo", "build", "--release", "-p", "exporter_bench", "--quiet")

sink_pid, url = start_sink
hang_pid, hang_url = start_sink("--hang")
begin
  ROUNDS.times do |round|
    puts "bench: round #{round + 1}/#{ROUNDS}"
    record.("sink ceiling", run_bin("ceiling", url, 1.0))
    SHAPES.each do |ids|
      record.("#{ids} limit", run_bin("limit", url, 1.5, ids))
      record.("#{ids} encode", run_bin("encode", url, 0, ids))
      %w[baseline sync writer].each do |impl|
        record.("#{ids} #{impl} alone", run_one("alone", impl, url, ids))
        record.("#{ids} #{impl} contention", run_one("contention", impl, url, ids))
        record.("#{ids} #{impl} fresh", run_one("fresh", impl, url, ids))
      end
      record.("#{ids} writer paced", run_one("paced", "writer", url, ids))
      record.("#{ids} kill", run_one("kill", "sync", hang_url, ids))
      record.("#{ids} idle gem", run_one("idle_rss", "gem", url, ids))
    end
    # Independent of the ids: no span reaches the fork hooks, and an
    # exposure has no span id.
    record.("system", run_one("fork_system", "ab", url))
    record.("fork", run_one("fork_fork", "ab", url))
    record.("idle none", run_one("idle_rss", "none", url))
    record.("exposures", run_one("record", "gem", url))
  end
ensure
  stop(sink_pid)
  stop(hang_pid)
end

med = ->(name, metric) { median(samples[name][metric]) }
fmt_range = lambda do |name, metric, digits|
  xs = samples[name][metric]
  return "n/a" if xs.empty?

  format("%.#{digits}f [%.#{digits}f..%.#{digits}f]", median(xs), xs.min, xs.max)
end

rows = lambda do |ids|
  [
    ["sink ceiling (pre-encoded, Rust client)", "sink ceiling", nil],
    ["limit (pre-built Rust spans, own encoder + HTTP client)", "#{ids} limit", nil],
    ["baseline (msgpack Packer + Net::HTTP)", "#{ids} baseline alone", "#{ids} baseline contention"],
    ["exporter sync (Transport#send_traces)", "#{ids} sync alone", "#{ids} sync contention"],
    ["exporter writer (Writer#write + flush)", "#{ids} writer alone", "#{ids} writer contention"]
  ]
end

lines = []
SHAPES.each do |ids|
  lines << "### ids: #{ids}"
  lines << ""
  lines << "| path | spans/s alone | thread CPU µs/span | process CPU µs/span | spans/s with spinner | spinner share | peak RSS MB |"
  lines << "|---|---|---|---|---|---|---|"
  rows.(ids).each do |label, alone, cont|
    lines << format("| %s | %s | %s | %s | %s | %s | %s |", label,
                    fmt_range.(alone, :spans_per_s, 0), fmt_range.(alone, :thread_cpu_us_per_span, 2),
                    fmt_range.(alone, :process_cpu_us_per_span, 2),
                    cont ? fmt_range.(cont, :spans_per_s, 0) : "-", cont ? fmt_range.(cont, :spinner_share, 2) : "-",
                    fmt_range.(alone, :peak_rss_mb, 0))
  end
  lines << format("| writer paced at 50k spans/s, with spinner | - | - | - | %s | %s | - |",
                  fmt_range.("#{ids} writer paced", :spans_per_s, 0), fmt_range.("#{ids} writer paced", :spinner_share, 2))
  lines << ""
  lines << "| other (ids: #{ids}) | median [min..max] |"
  lines << "|---|---|"
  %w[baseline sync writer].each do |impl|
    lines << "| #{impl}: calling-thread CPU µs/span on traces built just before export (hot, as in an app) | " \
             "#{fmt_range.("#{ids} #{impl} fresh", :thread_cpu_us_per_span, 2)} |"
  end
  lines << "| v0.4 encoder alone (Rust), CPU µs/span | #{fmt_range.("#{ids} encode", :encode_cpu_us_per_span, 3)} |"
  lines << "| Thread#kill of a stalled send, ms | #{fmt_range.("#{ids} kill", :kill_ms, 3)} |"
  lines << "| idle RSS MB, + exporter loaded, runtime started | #{fmt_range.("#{ids} idle gem", :rss_mb, 1)} |"
  lines << ""
end
lines << "| shared (no ids involved) | median [min..max] |"
lines << "|---|---|"
lines << "| system(\"true\") µs, without gem | #{fmt_range.('system', :none_us, 0)} |"
lines << "| system(\"true\") µs, with gem (runtime running) | #{fmt_range.('system', :gem_us, 0)} |"
lines << "| fork hooks run per system(\"true\") (Ruby #{RUBY_VERSION}) | #{fmt_range.('system', :hooks_run_per_call, 0)} |"
lines << "| fork { exit! } + wait µs, without gem | #{fmt_range.('fork', :none_us, 0)} |"
lines << "| fork { exit! } + wait µs, with gem (runtime running; hooks stop and restart it) | #{fmt_range.('fork', :gem_us, 0)} |"
lines << "| idle RSS MB, msgpack + net/http loaded | #{fmt_range.('idle none', :rss_mb, 1)} |"
lines << "| Exposures#record µs/call on the Ruby thread, new assignment (3 attributes) | #{fmt_range.('exposures', :record_us, 2)} |"
lines << "| Exposures#record µs/call on the Ruby thread, deduplicated | #{fmt_range.('exposures', :record_dedup_us, 2)} |"

# Flag-evaluation counts (bench/flag_evaluations.rb, its own rounds).
flag_out, flag_err, flag_st = Open3.capture3({ "BENCH_ROUNDS" => ROUNDS.to_s, "BENCH_CALLS" => "100000" },
                                             RUBY, File.join(ROOT, "bench", "flag_evaluations.rb"))
raise "flag_evaluations.rb failed: #{flag_err}" unless flag_st.success?

flag_runs = JSON.parse(flag_out.lines.last)
flag_med = ->(name, key) { median(flag_runs.fetch(name).map { |r| r[key] }) }
flag_fmt = lambda do |name, key|
  xs = flag_runs.fetch(name).map { |r| r[key] }
  format("%.2f [%.2f..%.2f]", median(xs), xs.min, xs.max)
end
flag_runs.each_key do |name|
  lines << "| FlagEvaluations: #{name}, µs/call on the Ruby thread | #{flag_fmt.(name, 'call')} |"
  lines << "| FlagEvaluations: #{name}, worker µs/evaluation | #{flag_fmt.(name, 'worker')} |"
end

sys_ratio = med.("system", :gem_to_none)
targets = []
SHAPES.each do |ids|
  base_cpu = med.("#{ids} baseline alone", :thread_cpu_us_per_span)
  base_rate = med.("#{ids} baseline alone", :spans_per_s)
  base_cont = med.("#{ids} baseline contention", :spans_per_s)
  writer_cpu = med.("#{ids} writer alone", :thread_cpu_us_per_span)
  writer_rate = med.("#{ids} writer alone", :spans_per_s)
  paced = samples["#{ids} writer paced"]
  paced_lost = %i[dropped failed unflushed].sum { |k| paced[k].max.to_i }
  paced_rate = med.("#{ids} writer paced", :spans_per_s)
  paced_share = med.("#{ids} writer paced", :spinner_share)
  rss_added = med.("#{ids} idle gem", :rss_mb) - med.("idle none", :rss_mb)
  cpu_target = ids == "ddtrace" ? 0.35 : 0.5
  targets << ["#{ids}: writer calling-thread CPU <= #{cpu_target} µs/span", writer_cpu <= cpu_target,
              format("%.2f µs (%.1fx less than baseline)", writer_cpu, base_cpu / writer_cpu)]
  if ids == "random64"
    targets << ["#{ids}: writer spans/s alone >= 4x baseline", writer_rate >= 4 * base_rate,
                format("%.1fx", writer_rate / base_rate)]
  end
  targets.push(
    ["#{ids}: paced writer under contention: nothing dropped, failed or unflushed", paced_lost.zero?, "#{paced_lost} lost"],
    ["#{ids}: paced writer delivered >= 10x baseline flat out under contention", paced_rate >= 10 * base_cont,
     format("%.0f vs %.0f spans/s (%.1fx)", paced_rate, base_cont, paced_rate / base_cont)],
    ["#{ids}: spinner keeps >= 90% of its solo speed (paced writer)", paced_share >= 0.9,
     format("%.0f%%", paced_share * 100)],
    ["#{ids}: Thread#kill of a stalled send <= 1 ms median", med.("#{ids} kill", :kill_ms) <= 1.0,
     format("%.3f ms", med.("#{ids} kill", :kill_ms))],
    ["#{ids}: extension + runtime add <= 10 MB RSS when idle", rss_added <= 10, format("%+.1f MB", rss_added)]
  )
end
targets.push(
  ["fork hooks add <= 10% to system(\"true\")", sys_ratio <= 1.10, format("%+.1f%%", (sys_ratio - 1) * 100)],
  ["Exposures#record <= 1 µs, new assignment (3 attributes)", med.("exposures", :record_us) <= 1.0,
   format("%.2f µs", med.("exposures", :record_us))],
  ["Exposures#record <= 0.3 µs, deduplicated", med.("exposures", :record_dedup_us) <= 0.3,
   format("%.2f µs", med.("exposures", :record_dedup_us))]
)
flag_runs.each do |name, runs|
  target = runs.first.fetch("target")
  targets << ["FlagEvaluations #{name} <= #{target} µs/call", flag_med.(name, "call") <= target,
              format("%.2f µs", flag_med.(name, "call"))]
end

lines << ""
lines << "| target | result | |"
lines << "|---|---|---|"
targets.each { |label, ok, detail| lines << "| #{label} | #{detail} | #{ok ? 'PASS' : 'FAIL'} |" }

require "etc"
header = "# Benchmark results\n\n#{ROUNDS} rounds, #{Time.now.utc.strftime('%Y-%m-%d %H:%M UTC')}, Ruby #{RUBY_VERSION}, " \
         "#{Etc.nprocessors} CPUs, load average at the end #{File.read('/proc/loadavg').split[0, 3].join(' ')}. " \
         "Medians [min..max]. Workload: traces of 50 spans (6 meta, 3 metrics), 10 traces per request for the " \
         "synchronous paths, in two id shapes (bench/workload.rb): `ddtrace` (a 128-bit trace id object shared by " \
         "the trace's spans, random 62-bit span ids) and `random64` (random 64-bit trace, span and parent ids).\n\n"
Dir.mkdir(RESULTS) unless Dir.exist?(RESULTS)
md = header + lines.join("\n") + "\n\n![chart](latest.png)\n"
File.write(File.join(RESULTS, "latest.md"), md)
puts
puts lines

# Chart: spans/s alone and with a spinning thread, per path (log scale).
dat = File.join(RESULTS, "latest.dat")
File.open(dat, "w") do |f|
  i = 0
  SHAPES.each do |ids|
    rows.(ids).drop(1).each do |label, alone, cont|
      f.puts format("%d \"%s\" %.0f %.0f", i, "#{label.split(' (').first} (#{ids})", med.(alone, :spans_per_s),
                    cont ? med.(cont, :spans_per_s) : 0)
      i += 1
    end
    f.puts format("%d \"%s\" %.0f %.0f", i, "writer paced (#{ids})", 0, med.("#{ids} writer paced", :spans_per_s))
    i += 1
  end
end
gp = <<~GP
  set terminal pngcairo size 1400,600
  set output "#{File.join(RESULTS, 'latest.png')}"
  set title "spans/s exported: alone vs with one CPU-bound Ruby thread (log scale)"
  set style data histograms
  set style histogram clustered gap 1
  set style fill solid 0.8
  set logscale y
  set yrange [1000:*]
  set xtics rotate by -15
  set key top right
  plot "#{dat}" using 3:xtic(2) title "alone", "" using 4 title "with spinner"
GP
if system("which gnuplot > /dev/null 2>&1")
  IO.popen(["gnuplot"], "w") { |io| io.write(gp) }
else
  warn "bench: gnuplot not found, no chart"
end
File.delete(dat)
puts
puts "bench: wrote #{File.join(RESULTS, 'latest.md')} and latest.png"
exit(targets.all? { |_, ok, _| ok } ? 0 : 1)
