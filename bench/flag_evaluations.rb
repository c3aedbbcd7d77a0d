# frozen_string_literal: true

# Flag-evaluation counts: what an evaluation costs the calling thread, and
# what the native worker spends per evaluation.
#
#   ruby bench/flag_evaluations.rb          # BENCH_ROUNDS (5) rounds of BENCH_CALLS (200,000)
#   BENCH_ONLY=Hook ruby bench/flag_evaluations.rb   # only the measures whose name matches
#
# Needs the extension built (`rake compile`). Prints, per measure, the
# median over the rounds with min..max:
# - `record` and `Hook#finally` (the SDK's classes, spec/support/
#   sdk_shapes.rb) calling-thread CPU in µs/call
#   (CLOCK_THREAD_CPUTIME_ID), with a 5-field context, without consent
#   (the default: the context is not walked) and with it (`full_data: true`
#   / `observe_full_evaluation_data`: walked and copied); with consent,
#   the hook also with `exposures:` (an exposure per call, most of them
#   duplicates);
# - the worker's CPU per evaluation (draining, keying, pruning, hashing,
#   aggregating, and the JSON + HTTP of the flush at the end), read from
#   the runtime threads' /proc schedstat.
# Target: <= 1 µs/call for `record` and `Hook#finally` with a 5-field context
# (1.3 with exposures: see EXPOSURES_TARGET_US).

$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
require "exporter"
require "socket"

ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "5"))
CALLS = Integer(ENV.fetch("BENCH_CALLS", "200000"))
TARGET_US = 1.0
# A hook call with `exposures:` records an evaluation and an exposure, most
# of them duplicates: held to the sum of their targets (Hook#finally 1 µs,
# a deduplicated Exposures#record 0.3 µs).
EXPOSURES_TARGET_US = TARGET_US + 0.3

def target_us(name) = name.include?("exposures") ? EXPOSURES_TARGET_US : TARGET_US
KEYS = Array.new(1000) { |i| "user-#{i}" }.freeze
CONTEXT = { "plan" => "pro", "country" => "fr", "age" => 30, "beta" => true, "ratio" => 0.25 }.freeze

# The smallest agent: answers 202 to every request, in a Ruby thread.
class Sink
  def initialize
    @server = TCPServer.new("127.0.0.1", 0)
    @thread = Thread.new { loop { serve(@server.accept) } }
  end

  def url = "http://127.0.0.1:#{@server.addr[1]}"

  def serve(sock)
    Thread.new do
      while (line = sock.gets)
        len = 0
        while (h = sock.gets) && h != "\r\n"
          len = h.split(":", 2)[1].to_i if h.downcase.start_with?("content-length")
        end
        sock.read(len)
        sock.write("HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}") if line
      end
    rescue IOError, SystemCallError
      nil
    ensure
      sock.close
    end
  end
end

# openfeature-sdk's objects, as the specs build them (the SDK is not needed):
# the variant, error and metadata are read through Forwardable delegators.
require_relative "../spec/support/sdk_shapes"

def thread_cpu = Process.clock_gettime(Process::CLOCK_THREAD_CPUTIME_ID)

# Nanoseconds on CPU of the exporter's runtime threads.
def runtime_cpu_ns
  Dir["/proc/self/task/*"].sum do |t|
    next 0 unless File.read("#{t}/comm").start_with?("exporter-rt")

    File.read("#{t}/schedstat").split.first.to_i
  rescue Errno::ENOENT
    0
  end
end

ONLY = Regexp.new(ENV.fetch("BENCH_ONLY", ""))

def measure(name, results)
  return unless ONLY.match?(name)

  evals = Exporter::FlagEvaluations.new(url: $sink.url, flush_interval: 3600, queue_size: CALLS)
  worker_before = runtime_cpu_ns
  started = thread_cpu
  yield evals
  call_us = (thread_cpu - started) * 1e6 / CALLS
  flushed = evals.flush(timeout: 30)
  worker_ns = (runtime_cpu_ns - worker_before).to_f
  s = evals.stats
  evals.close
  counted = s[:sent] + s[:pending]
  (results[name] ||= []) << { call: call_us, worker: worker_ns / 1000 / [counted, 1].max, dropped: s[:dropped],
                              flushed: flushed }
end

def median(xs) = xs.sort[xs.size / 2]

$sink = Sink.new
results = {}
meta_default = { "__dd_allocation_key" => "rollout" }.freeze
meta_consent = { "__dd_allocation_key" => "rollout", "observe_full_evaluation_data" => true }.freeze
ROUNDS.times do
  [false, true].each do |full|
    measure("record (5-field context, #{full ? 'full_data' : 'default privacy'})", results) do |e|
      i = 0
      while i < CALLS
        e.record(flag: "checkout", variant: "on", allocation: "rollout", targeting_key: KEYS[i % 1000],
                 context: CONTEXT, full_data: full)
        i += 1
      end
    end
  end
  contexts = KEYS.map do |k|
    SdkShapes.hook_context("checkout", SdkShapes::EvaluationContext.new(targeting_key: k, **CONTEXT.transform_keys(&:to_sym)))
  end
  [[meta_default, false], [meta_consent, false], [meta_consent, true]].each do |meta, expose|
    consent = meta.key?("observe_full_evaluation_data")
    name = "Hook#finally (5-field context, #{consent ? 'consent' : 'default privacy'}#{expose ? ', exposures' : ''})"
    details = SdkShapes.details(flag: "checkout", variant: "on", metadata: meta)
    # With exposures: each call records one too, the 1,000 subjects' first
    # ones new, the rest deduplicated (users come back).
    exposures = Exporter::Exposures.new(url: $sink.url, flush_interval: 3600, buffer_size: 4096) if expose
    measure(name, results) do |e|
      hook = Exporter::OpenFeature::Hook.new(evaluations: e, exposures: exposures)
      i = 0
      while i < CALLS
        hook.finally(hook_context: contexts[i % 1000], evaluation_details: details)
        i += 1
      end
    end
    exposures&.close
  end
end

puts "flag evaluations: #{ROUNDS} rounds x #{CALLS} calls; median (min..max)"
puts format("%-52s %22s %24s %s", "measure", "calling thread µs/call", "worker µs/evaluation", "target")
results.each do |name, runs|
  calls = runs.map { |r| r[:call] }
  worker = runs.map { |r| r[:worker] }
  verdict = median(calls) <= target_us(name) ? "PASS" : "FAIL"
  dropped = runs.sum { |r| r[:dropped] }
  note = dropped.positive? ? " (#{dropped} dropped: queue full)" : ""
  note += " (a flush failed)" unless runs.all? { |r| r[:flushed] }
  puts format("%-52s %8.3f (%.3f..%.3f) %10.3f (%.3f..%.3f)   <= %.1f µs %s%s", name, median(calls), calls.min,
              calls.max, median(worker), worker.min, worker.max, target_us(name), verdict, note)
end
# For bench/bench.rb: every round's figures, and the target, by measure.
require "json"
puts JSON.generate(results.to_h { |name, runs| [name, runs.map { |r| r.slice(:call, :worker).merge(target: target_us(name)) }] })
