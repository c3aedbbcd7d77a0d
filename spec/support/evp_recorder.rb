# frozen_string_literal: true

require "json"
require "set"
require "json_schemer"
require_relative "scripted_server"

# The agent's EVP proxy for flag-evaluation counts, of our own: the test
# agent has no route for /evp_proxy/v2/api/v2/flagevaluation (it answers
# 404). A ScriptedServer that answers 202 (or what `script` says) and keeps
# raw requests; every body read through it is validated against the
# intake's JSON Schema.
class EvpRecorder < ScriptedServer
  PATH = "/evp_proxy/v2/api/v2/flagevaluation"
  # The intake's JSON Schema (a copy of shared/schemas/batchedflagevaluations.json).
  SCHEMA_FILE = File.expand_path("../fixtures/batchedflagevaluations.json", __dir__)

  def self.schema
    @schema ||= JSONSchemer.schema(JSON.parse(File.read(SCHEMA_FILE)))
  end

  # Validation errors of a parsed body (empty when valid).
  def self.schema_errors(body)
    schema.validate(body).map { |e| "#{e['data_pointer']}: #{e['type']} (#{e['schema_pointer']})" }.to_a
  end

  def initialize(&script)
    super(&(script || ->(_n) { [202, {}, "{}"] }))
  end

  # Parsed bodies of the flag-evaluation requests, each checked against
  # the schema (raises on the first invalid one).
  def bodies
    received.select { |r| r.path == PATH }.map do |r|
      body = JSON.parse(r.body)
      errors = self.class.schema_errors(body)
      raise "body does not match the intake schema: #{errors.first(5).join('; ')}" unless errors.empty?

      body
    end
  end

  def rows = bodies.flat_map { |b| b["flagEvaluations"] }

  def evaluation_count = rows.sum { |r| r["evaluation_count"] }
end
