# frozen_string_literal: true

require "msgpack"
require "net/http"

# What Ruby tracers do today: msgpack-ruby's streaming Packer builds the
# v0.4 payload on the calling thread, and Net::HTTP (keep-alive) POSTs it.
class BaselineExporter
  HEADERS = {
    "Content-Type" => "application/msgpack", "Datadog-Meta-Lang" => "ruby",
    "Datadog-Meta-Lang-Version" => RUBY_VERSION, "Datadog-Meta-Lang-Interpreter" => RUBY_ENGINE,
    "Datadog-Meta-Tracer-Version" => "baseline"
  }.freeze
  LOW64 = (2**64) - 1

  def initialize(url)
    uri = URI(url)
    @http = Net::HTTP.new(uri.host, uri.port)
    @http.keep_alive_timeout = 30
    @http.start
    @packer = MessagePack::Packer.new
  end

  def send_traces(traces)
    body = encode(traces)
    req = Net::HTTP::Post.new("/v0.4/traces", HEADERS.merge("X-Datadog-Trace-Count" => traces.size.to_s))
    req.body = body
    res = @http.request(req)
    raise "baseline: HTTP #{res.code}" unless res.code == "200"

    res
  end

  def encode(traces)
    pk = @packer
    pk.clear
    pk.write_array_header(traces.size)
    traces.each do |trace|
      pk.write_array_header(trace.size)
      trace.each_with_index do |s, i|
        # A 128-bit trace id goes out as its low 64 bits, the high 64 bits
        # in hex in meta "_dd.p.tid" of the first span (as ddtrace does).
        tid = s[:trace_id]
        high = tid >> 64
        pk.write_map_header(12)
        pk.write("trace_id").write(high.zero? ? tid : tid & LOW64)
        pk.write("span_id").write(s[:span_id])
        pk.write("parent_id").write(s[:parent_id])
        pk.write("name").write(s[:name])
        pk.write("service").write(s[:service])
        pk.write("resource").write(s[:resource])
        pk.write("type").write(s[:type])
        pk.write("start").write(s[:start])
        pk.write("duration").write(s[:duration])
        pk.write("error").write(s[:error])
        if i.zero? && !high.zero?
          pk.write("meta").write(s[:meta].merge("_dd.p.tid" => format("%016x", high)))
        else
          pk.write("meta").write(s[:meta])
        end
        pk.write("metrics").write(s[:metrics])
      end
    end
    pk.to_s
  end

  def close = @http.finish
end
