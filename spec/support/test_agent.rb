# frozen_string_literal: true

require "base64"
require "json"
require "uri"
require "net/http"
require "socket"
require "tmpdir"

# Datadog's ddapm-test-agent (installed by bin/setup in .venv), with its
# trace checks on and failures pooled. One agent serves the whole suite;
# specs clear its session first.
class TestAgent
  ROOT = File.expand_path("../..", __dir__)
  BIN = File.join(ROOT, ".venv", "bin", "ddapm-test-agent")
  CHECKS = "trace_count_header,meta_tracer_version_header,trace_content_length"

  attr_reader :port, :socket_path

  def self.shared
    @shared ||= new.tap(&:start)
  end

  def self.stop_shared
    @shared&.stop
    @shared = nil
  end

  def self.free_port
    s = TCPServer.new("127.0.0.1", 0)
    s.addr[1]
  ensure
    s&.close
  end

  def initialize
    @dir = Dir.mktmpdir("test-agent")
    @socket_path = File.join(@dir, "apm.socket")
    @port = self.class.free_port
  end

  def url = "http://127.0.0.1:#{port}"
  def unix_url = "unix://#{socket_path}"

  def start
    raise "#{BIN} missing: run bin/setup" unless File.executable?(BIN)

    env = { "ENABLED_CHECKS" => CHECKS, "DD_POOL_TRACE_CHECK_FAILURES" => "1", "PYTHONUNBUFFERED" => "1" }
    ports = [self.class.free_port, self.class.free_port]
    @log = File.join(@dir, "agent.log")
    @pid = Process.spawn(env, BIN, "--port=#{port}", "--otlp-http-port=#{ports[0]}",
                         "--otlp-grpc-port=#{ports[1]}", "--trace-uds-socket=#{socket_path}",
                         out: @log, err: @log, pgroup: true)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 30
    until ready?
      if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
        stop
        raise "test agent did not start: #{File.read(@log) rescue '?'}" # rubocop:disable Style/RescueModifier
      end
      sleep 0.1
    end
    self
  end

  def ready?
    get("/info").is_a?(Net::HTTPSuccess) && File.socket?(socket_path)
  rescue SystemCallError, IOError, Net::ReadTimeout, Net::OpenTimeout
    false
  end

  def stop
    return unless @pid

    begin
      Process.kill(:TERM, -@pid)
    rescue Errno::ESRCH
      nil
    end
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 5
    until Process.waitpid(@pid, Process::WNOHANG)
      if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
        Process.kill(:KILL, -@pid) rescue nil # rubocop:disable Style/RescueModifier
        Process.waitpid(@pid)
        break
      end
      sleep 0.05
    end
    @pid = nil
  rescue Errno::ECHILD
    @pid = nil
  end

  def get(path)
    Net::HTTP.start("127.0.0.1", port, open_timeout: 2, read_timeout: 10) { |h| h.get(path) }
  end

  # Forgets what was received and starts a session answering senders with
  # `rates` as rate_by_service.
  def clear(rates: { "service:shop,env:" => 0.5 })
    get("/test/session/clear")
    get("/test/session/start?agent_sample_rate_by_service=#{URI.encode_www_form_component(JSON.generate(rates))}")
    self
  end

  # Traces the agent decoded: Array of Arrays of span Hashes.
  def traces
    JSON.parse(get("/test/session/traces").body)
  end

  # Every span of every trace received, flattened.
  def spans = traces.flatten

  # Raw requests received (path, headers, base64 body).
  def requests
    JSON.parse(get("/test/session/requests").body)
  end

  # Bodies (parsed JSON) of the EVP exposure requests received, with their
  # headers: [[headers, body], ...].
  def exposure_requests
    requests.select { |r| r["url"].to_s.include?("/evp_proxy/v2/api/v2/exposures") }.map do |r|
      [r["headers"].transform_keys(&:downcase), JSON.parse(Base64.decode64(r["body"]))]
    end
  end

  # Every exposure event received, in order.
  def exposures = exposure_requests.flat_map { |_, body| body["exposures"] }

  # nil when no trace check failed, else the failure text.
  def check_failures
    r = get("/test/trace_check/failures")
    r.code == "200" ? nil : r.body
  end
end
