# frozen_string_literal: true

# Conversion cost under callgrind (repeatable on a loaded machine, unlike
# wall-clock figures): converts TRACES pre-built traces of the given id
# shape through Writer#write (a writer whose flusher never sends during
# the run), so only the calling thread's work is in the profile.
#
#   valgrind --tool=callgrind --toggle-collect='exporter::convert::trace*' \
#     ruby bench/profile.rb random64 [TRACES]
#   callgrind_annotate callgrind.out.PID | head
#
# Instructions per span = the total in the toggled function / (TRACES * 50).
# `ruby bench/profile.rb exposures` profiles Exposures#record instead
# (toggle 'exporter::exposures::Exposures::record*').
#
# `ruby bench/profile.rb hook [CALLS]` profiles OpenFeature::Hook#finally
# as bench/flag_evaluations.rb measures it (spec/support/sdk_shapes.rb, 5-field
# context, no consent; `hook-consent` with consent). Hook#finally is Ruby,
# so no symbol to toggle: run with --separate-threads=yes and compare the
# main thread's total (the `-01` file) for two CALLS values:
# instructions per call = (total(2N) - total(N)) / N.
$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
require "exporter"
require_relative "workload"

shape = ARGV.fetch(0, "random64")
count = Integer(ARGV.fetch(1, "200"))
if shape == "exposures"
  # `exposures COUNT [new|dedup]`: COUNT new assignments (3 attributes),
  # then COUNT duplicates, or only one kind. `_record` is inlined into
  # magnus's wrapper: toggle 'exporter::exposures::init::anon*'; per call =
  # total / COUNT for one kind.
  e = Exporter::Exposures.new(url: "http://127.0.0.1:9", flush_interval: 3600, buffer_size: 100_000)
  attrs = { "plan" => "pro", "country" => "fr", "age" => 30 }
  kind = ARGV[2]
  # Made before the profiled calls: only #record is measured.
  ids = Array.new(count) { |i| "user-#{i}" }
  if kind != "dedup"
    count.times do |i|
      e.record(flag: "checkout", allocation: "rollout", variant: "on", subject_id: ids[i], subject_attributes: attrs)
    end
  end
  if kind != "new"
    e.record(flag: "checkout", allocation: "rollout", variant: "on", subject_id: "user-1", subject_attributes: attrs)
    count.times do
      e.record(flag: "checkout", allocation: "rollout", variant: "on", subject_id: "user-1", subject_attributes: attrs)
    end
  end
  p e.stats
  exit!(0)
end
if shape.start_with?("hook")
  require_relative "../spec/support/sdk_shapes"
  meta = { "__dd_allocation_key" => "rollout" }
  meta["observe_full_evaluation_data"] = true if shape == "hook-consent"
  context = { "plan" => "pro", "country" => "fr", "age" => 30, "beta" => true, "ratio" => 0.25 }
  evals = Exporter::FlagEvaluations.new(url: "http://127.0.0.1:9", flush_interval: 3600, queue_size: count + 1)
  hook = Exporter::OpenFeature::Hook.new(evaluations: evals)
  contexts = Array.new(1000) do |i|
    SdkShapes.hook_context("checkout", SdkShapes::EvaluationContext.new(targeting_key: "user-#{i}", **context.transform_keys(&:to_sym)))
  end
  details = SdkShapes.details(flag: "checkout", variant: "on", metadata: meta.freeze)
  i = 0
  while i < count
    hook.finally(hook_context: contexts[i % 1000], evaluation_details: details, hints: nil)
    i += 1
  end
  p evals.stats.slice(:recorded, :dropped, :hook_failures)
  exit!(0)
end
traces = Workload.traces(count, shape)
t = Exporter::Transport.new(url: "http://127.0.0.1:9")
w = Exporter::Writer.new(transport: t, buffer_size: count * 2, flush_interval: 3600)
traces.each { |tr| w.write(tr) }
p w.stats
exit!(0)
