# frozen_string_literal: true

module Exporter
  # Agent settings from the standard Datadog environment variables; each
  # reader returns the value an explicit keyword argument would override.
  module Config
    DEFAULT_HOST = "127.0.0.1"
    DEFAULT_PORT = 8126
    DEFAULT_TIMEOUT = 3.0
    DEFAULT_MAX_PAYLOAD_SIZE = 5 * 1024 * 1024

    module_function

    # DD_TRACE_AGENT_URL, else http://DD_AGENT_HOST:DD_TRACE_AGENT_PORT.
    def agent_url(env = ENV)
      url = env["DD_TRACE_AGENT_URL"]
      return url unless url.nil? || url.empty?

      host = env.fetch("DD_AGENT_HOST", "")
      host = DEFAULT_HOST if host.empty?
      port = env.fetch("DD_TRACE_AGENT_PORT", "")
      port = DEFAULT_PORT if port.empty?
      host = "[#{host}]" if host.include?(":") && !host.start_with?("[")
      "http://#{host}:#{port}"
    end

    # DD_TRACE_AGENT_TIMEOUT_SECONDS, else 3.0.
    def timeout(env = ENV)
      value = env["DD_TRACE_AGENT_TIMEOUT_SECONDS"]
      return DEFAULT_TIMEOUT if value.nil? || value.empty?

      Float(value)
    rescue ArgumentError
      raise ArgumentError, "DD_TRACE_AGENT_TIMEOUT_SECONDS must be a number (got #{value.inspect})"
    end

    # DD_FLAGGING_EVALUATION_COUNTS_ENABLED: "false" or "0" (any case)
    # turns flag-evaluation counts off; anything else, or unset, is on.
    def flag_evaluation_counts_enabled?(env = ENV)
      value = env.fetch("DD_FLAGGING_EVALUATION_COUNTS_ENABLED", "").strip.downcase
      !%w[false 0].include?(value)
    end

    # The agent and service options every sender takes, each defaulted from
    # the environment and checked (ArgumentError naming the option).
    def sender_options(url:, timeout:, service:, env:, version:)
      {
        url: Args.string(:url, url || agent_url),
        timeout: Args.seconds(:timeout, timeout || self.timeout),
        service: Args.string(:service, service || self.service),
        env: Args.string(:env, env || env_name),
        version: Args.string(:version, version || self.version)
      }
    end

    def service(env = ENV) = env.fetch("DD_SERVICE", "")
    def env_name(env = ENV) = env.fetch("DD_ENV", "")
    def version(env = ENV) = env.fetch("DD_VERSION", "")
  end
end
