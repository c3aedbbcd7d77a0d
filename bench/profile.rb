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
traces = Workload.traces(count, shape)
t = Exporter::Transport.new(url: "http://127.0.0.1:9")
w = Exporter::Writer.new(transport: t, buffer_size: count * 2, flush_interval: 3600)
traces.each { |tr| w.write(tr) }
p w.stats
exit!(0)
