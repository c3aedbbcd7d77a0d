# frozen_string_literal: true

require "digest"

RSpec.describe Exporter::FlagEvaluations do
  T0 = 1_760_000_000_000 # after the schema's minimum (2025-10-01)

  let(:server) { @server ||= EvpRecorder.new }

  after do
    @evals&.close(timeout: 2)
    @server&.close
  end

  def evals(**opts)
    @evals = described_class.new(url: server.url, flush_interval: 60, **opts)
  end

  def balanced?(stats)
    stats[:recorded] == stats[:sent] + stats[:dropped] + stats[:failed] + stats[:pending]
  end

  it "aggregates evaluations into rows with counts and min/max times, with the EVP headers" do
    e = evals(service: "shop", env: "prod", version: "")
    [5, 1, 9].each { |t| expect(e.record(flag: "checkout", variant: "on", allocation: "a1", timestamp_ms: T0 + t)).to be(true) }
    e.record(flag: "checkout", variant: "off", allocation: "a1", timestamp_ms: T0 + 3)
    e.record(flag: "checkout", timestamp_ms: T0 + 4, error_code: "FLAG_NOT_FOUND")
    expect(e.flush(timeout: 5)).to be(true)

    req = server.received.find { |r| r.path == EvpRecorder::PATH }
    expect(req.method).to eq("POST")
    expect(req.headers).to include("content-type" => "application/json",
                                   "x-datadog-evp-subdomain" => "event-platform-intake")
    body = server.bodies.first
    expect(body["context"]).to eq("service" => "shop", "env" => "prod")
    rows = server.rows.sort_by { |r| [r["variant"].to_s, r["evaluation_count"]] }
    expect(rows.map { |r| r.except("timestamp") }).to contain_exactly(
      { "flag" => { "key" => "checkout" }, "variant" => { "key" => "on" }, "allocation" => { "key" => "a1" },
        "first_evaluation" => T0 + 1, "last_evaluation" => T0 + 9, "evaluation_count" => 3 },
      { "flag" => { "key" => "checkout" }, "variant" => { "key" => "off" }, "allocation" => { "key" => "a1" },
        "first_evaluation" => T0 + 3, "last_evaluation" => T0 + 3, "evaluation_count" => 1 },
      { "flag" => { "key" => "checkout" }, "runtime_default_used" => true, "error" => { "message" => "FLAG_NOT_FOUND" },
        "first_evaluation" => T0 + 4, "last_evaluation" => T0 + 4, "evaluation_count" => 1 }
    )
    now = (Time.now.to_f * 1000).to_i
    expect(rows.map { |r| r["timestamp"] }).to all(be_within(60_000).of(now))
    expect(rows.flat_map(&:keys)).not_to include("reason", "targeting_rule")
    expect(e.stats).to include(recorded: 5, sent: 5, dropped: 0, failed: 0, pending: 0, degraded: 0)
  end

  it "hashes the targeting key and keeps no context without consent; sends raw data with full_data: true" do
    e = evals
    ctx = { "plan" => "pro", "age" => 30 }
    e.record(flag: "f", variant: "on", targeting_key: "user-1", context: ctx, error_code: "GENERAL",
             error_message: "boom: secret", timestamp_ms: T0)
    e.record(flag: "g", variant: "on", targeting_key: "user-1", context: ctx, error_code: "GENERAL",
             error_message: "boom: secret", timestamp_ms: T0, full_data: true)
    expect(e.flush(timeout: 5)).to be(true)
    f, g = server.rows.sort_by { |r| r["flag"]["key"] }
    expect(f["targeting_key"]).to eq("sha256_#{Digest::SHA256.hexdigest('user-1')}")
    expect(f).not_to have_key("context")
    expect(f["error"]).to eq("message" => "GENERAL")
    expect(g["targeting_key"]).to eq("user-1")
    expect(g["context"]).to eq("evaluation" => { "age" => 30, "plan" => "pro" })
    expect(g["error"]).to eq("message" => "boom: secret")
  end

  it "keeps 1 and \"1\" apart, and contexts that differ only in key order together" do
    e = evals
    e.record(flag: "f", variant: "on", targeting_key: "u", context: { "x" => 1 }, timestamp_ms: T0, full_data: true)
    e.record(flag: "f", variant: "on", targeting_key: "u", context: { "x" => "1" }, timestamp_ms: T0, full_data: true)
    e.record(flag: "f", variant: "on", targeting_key: "u", context: { a: 1, b: "2" }, timestamp_ms: T0, full_data: true)
    e.record(flag: "f", variant: "on", targeting_key: "u", context: { "b" => "2", "a" => 1 }, timestamp_ms: T0,
             full_data: true)
    expect(e.flush(timeout: 5)).to be(true)
    by_ctx = server.rows.to_h { |r| [r["context"]["evaluation"], r["evaluation_count"]] }
    expect(by_ctx).to eq({ "x" => 1 } => 1, { "x" => "1" } => 1, { "a" => 1, "b" => "2" } => 2)
  end

  it "prunes to exactly the first 256 sorted fields, skipping long strings and keys" do
    e = evals
    ctx = {}
    299.downto(0) { |i| ctx[format("k%03d", i)] = i }
    ctx["k000a"] = "x" * 257            # too long: skipped, does not count
    ctx["k000b#{'y' * 300}"] = "v"      # key too long: skipped
    ctx["k000c"] = "é" * 256            # 256 characters: kept
    e.record(flag: "f", variant: "on", targeting_key: "u", context: ctx, timestamp_ms: T0, full_data: true)
    expect(e.flush(timeout: 5)).to be(true)
    kept = server.rows.first["context"]["evaluation"]
    expect(kept.size).to eq(256)
    expect(kept.keys).to eq((["k000", "k000c"] + (1..254).map { |i| format("k%03d", i) }))
    expect(kept["k000c"]).to eq("é" * 256)
  end

  it "flattens nested Hashes and Arrays (a.b, a.0) to four levels and skips what cannot be kept" do
    e = evals
    ctx = { user: { plan: "pro", tags: ["a", nil, 2], deep: { l2: { l3: { l4: 4, l5: { l6: 6 } } } } },
            ratio: 0.5, ok: true, sym: :gold, nothing: nil, nan: Float::NAN, big: 2**70, time: Time.at(0),
            obj: Object.new, basic: BasicObject.new, 3 => "int key" }
    e.record(flag: "f", variant: "on", targeting_key: "u", context: ctx, timestamp_ms: T0, full_data: true)
    expect(e.flush(timeout: 5)).to be(true)
    expect(server.rows.first["context"]["evaluation"]).to eq(
      "user.plan" => "pro", "user.tags.0" => "a", "user.tags.2" => 2, "user.deep.l2.l3.l4" => 4,
      "ratio" => 0.5, "ok" => true, "sym" => "gold"
    )
  end

  it "degrades rows past the per-flag cap and counts every evaluation" do
    e = evals(queue_size: 20_000)
    n = 10_005
    n.times { |i| expect(e.record(flag: "f", variant: "on", targeting_key: "u#{i}", timestamp_ms: T0)).to be(true) }
    e.record(flag: "g", variant: "on", targeting_key: "u0", timestamp_ms: T0)
    expect(e.flush(timeout: 20)).to be(true)
    rows = server.rows
    full, degraded = rows.select { |r| r["flag"]["key"] == "f" }.partition { |r| r.key?("targeting_key") }
    expect(full.size).to eq(10_000)
    expect(degraded).to eq([{ "timestamp" => degraded.first["timestamp"], "flag" => { "key" => "f" },
                              "first_evaluation" => T0, "last_evaluation" => T0, "evaluation_count" => 5,
                              "variant" => { "key" => "on" } }])
    expect(rows.select { |r| r["flag"]["key"] == "g" }.map { |r| r["evaluation_count"] }).to eq([1])
    expect(server.evaluation_count).to eq(n + 1)
    expect(e.stats).to include(recorded: n + 1, sent: n + 1, degraded: 5, dropped: 0, pending: 0)
  end

  it "counts a queue overflow: calls = sent + dropped + failed + pending" do
    @server = EvpRecorder.new { [:sleep, 0.5, [202, {}, "{}"]] }
    e = evals(queue_size: 10)
    e.record(flag: "f", variant: "on", targeting_key: "first", timestamp_ms: T0)
    flusher = Thread.new { e.flush(timeout: 10) }
    # While the worker waits on the slow agent, nothing drains the queue.
    eventually { server.received.any? }
    results = (1..50).map { |i| e.record(flag: "f", variant: "on", targeting_key: "u#{i}", timestamp_ms: T0) }
    expect(results.count(true)).to eq(10)
    expect(flusher.value).to be(true) # the first row was sent
    s = e.stats
    expect(s).to include(recorded: 51, dropped: 40)
    expect(balanced?(s)).to be(true)
    expect(e.flush(timeout: 10)).to be(false) # something was dropped since the last flush
    s = e.stats
    expect(s).to include(recorded: 51, sent: 11, dropped: 40, failed: 0, pending: 0)
    expect(server.evaluation_count).to eq(11)
    expect(e.flush(timeout: 10)).to be(true)
  end

  it "keeps rows whose POST failed with a retryable error and sends them at the next flush" do
    @server = EvpRecorder.new { |n| n < 4 ? [500, {}, "down"] : [202, {}, "{}"] }
    e = evals(timeout: 1)
    3.times { |i| 2.times { e.record(flag: "f", variant: "on", targeting_key: "u#{i}", timestamp_ms: T0 + i) } }
    expect(e.flush(timeout: 10)).to be(false) # 1 attempt + 3 retries, all 500
    s = e.stats
    expect(s).to include(recorded: 6, sent: 0, failed: 0, pending: 6)
    expect(s[:last_error]).to include("500")
    expect(e.flush(timeout: 10)).to be(true)
    expect(e.stats).to include(recorded: 6, sent: 6, failed: 0, dropped: 0, pending: 0)
    ok = server.bodies.last["flagEvaluations"]
    expect(ok.map { |r| r["evaluation_count"] }).to eq([2, 2, 2])
  end

  it "counts rows the agent refuses for good as failed" do
    @server = EvpRecorder.new { [400, {}, "bad"] }
    e = evals
    e.record(flag: "f", variant: "on", timestamp_ms: T0)
    expect(e.flush(timeout: 5)).to be(false)
    expect(e.stats).to include(recorded: 1, sent: 0, failed: 1, pending: 0)
    expect(server.received.size).to eq(1) # never retried
  end

  it "returns promptly on cyclic, shared and 100,000-deep contexts" do
    e = evals
    cyclic = { "a" => 1 }
    cyclic["self"] = cyclic
    cyclic["list"] = [cyclic, 2]
    deep = cur = {}
    100_000.times { cur = (cur["n"] = {}) }
    cur["leaf"] = 1
    shared = { "v" => 1 }
    wide = {}
    64.times { |i| wide["k#{i}"] = shared }
    fanout = {}
    64.times { |i| fanout["k#{i}"] = wide } # 64^3 paths: bounded by the node budget
    t = monotonic
    [cyclic, deep, fanout].each do |ctx|
      expect(e.record(flag: "f", variant: "on", targeting_key: "u", context: ctx, timestamp_ms: T0,
                      full_data: true)).to be(true)
    end
    expect(monotonic - t).to be < 1.0
    expect(e.flush(timeout: 10)).to be(true)
    contexts = server.rows.map { |r| r["context"]&.fetch("evaluation") }
    expect(contexts).to include({ "a" => 1, "list.1" => 2 })
    expect(contexts.compact.map(&:size)).to all(be <= 256)
  end

  it "raises ArgumentError naming the argument" do
    e = evals
    expect { e.record(flag: nil) }.to raise_error(ArgumentError, /flag/)
    expect { e.record(flag: 1) }.to raise_error(ArgumentError, /flag/)
    expect { e.record(flag: "f", variant: 1) }.to raise_error(ArgumentError, /variant/)
    expect { e.record(flag: "f", allocation: []) }.to raise_error(ArgumentError, /allocation/)
    expect { e.record(flag: "f", targeting_key: 1.5) }.to raise_error(ArgumentError, /targeting_key/)
    expect { e.record(flag: "f", context: [1]) }.to raise_error(ArgumentError, /context/)
    expect { e.record(flag: "f", error_code: 1) }.to raise_error(ArgumentError, /error_code/)
    expect { e.record(flag: "f", error_message: 1) }.to raise_error(ArgumentError, /error_message/)
    expect { e.record(flag: "f", timestamp_ms: "now") }.to raise_error(ArgumentError, /timestamp_ms/)
    # The intake refuses a whole body with a row outside its range: refused here, one by one.
    [-1, 0, 1_700_000_000, 1_700_000_000_000, 2**53 + 1, 2**100].each do |ms|
      expect { e.record(flag: "f", timestamp_ms: ms) }.to raise_error(ArgumentError, /timestamp_ms/)
    end
    expect { described_class.new(url: server.url, queue_size: 0) }.to raise_error(ArgumentError, /queue_size/)
    expect { described_class.new(url: server.url, flush_interval: 0) }.to raise_error(ArgumentError, /flush_interval/)
    expect(e.stats[:recorded]).to eq(0)
  end

  it "returns false after close, counted as dropped" do
    e = evals
    e.record(flag: "f", variant: "on", timestamp_ms: T0)
    expect(e.close).to be(true)
    expect(e.close).to be(true)
    expect(e.record(flag: "f", variant: "on", timestamp_ms: T0)).to be(false)
    expect(e.stats).to include(recorded: 2, sent: 1, dropped: 1, pending: 0)
  end

  describe "in other processes" do
    def run_ruby(code, env: {})
      out = IO.pipe
      pid = Process.spawn(env, ruby_bin, "-I", lib_dir, "-e", code, out: out[1], err: out[1])
      out[1].close
      status = wait_bounded(pid, timeout: 30)
      [status, out[0].read]
    ensure
      out[0].close unless out[0].closed?
    end

    it "is a no-op with the killswitch: record returns false, nothing is sent, no worker runs" do
      %w[false FALSE 0 False].each do |value|
        status, output = run_ruby(<<~RUBY, env: { "DD_FLAGGING_EVALUATION_COUNTS_ENABLED" => value })
          require "exporter"
          e = Exporter::FlagEvaluations.new(url: #{server.url.dump}, flush_interval: 0.05)
          p e.record(flag: "f", variant: "on")
          p e.flush(timeout: 1)
          p e.stats.values_at(:recorded, :pending)
          p Exporter::FlagEvaluations.instance_method(:enabled?).bind(e).call
          p Dir["/proc/self/task/*/comm"].count { |f| File.read(f).start_with?("exporter-rt") }
        RUBY
        expect(status.success?).to be(true), output
        expect(output.lines.map(&:chomp)).to eq(["false", "true", "[0, 0]", "false", "0"])
      end
      expect(server.received).to be_empty
    end

    it "flushes at exit in a short-lived process" do
      status, output = run_ruby(<<~RUBY)
        require "exporter"
        e = Exporter::FlagEvaluations.new(url: #{server.url.dump}, flush_interval: 60)
        3.times { e.record(flag: "exit-flag", variant: "on", timestamp_ms: #{T0}) }
      RUBY
      expect(status.success?).to be(true), output
      expect(server.rows.map { |r| [r["flag"]["key"], r["evaluation_count"]] }).to eq([["exit-flag", 3]])
    end

    it "sends the parent's counts once, by the parent, and the child's by the child" do
      e = evals
      5.times { e.record(flag: "f", variant: "on", targeting_key: "parent", timestamp_ms: T0, full_data: true) }
      status = fork_and_wait(timeout: 30) do
        7.times { e.record(flag: "f", variant: "on", targeting_key: "child", timestamp_ms: T0, full_data: true) }
        raise "child flush failed" unless e.flush(timeout: 10)

        s = e.stats
        raise "child stats #{s}" unless s[:recorded] == 7 && s[:sent] == 7
      end
      expect(status.success?).to be(true)
      expect(e.flush(timeout: 10)).to be(true)
      eventually_via_sidecar { server.rows.size >= 2 }
      counts = server.rows.group_by { |r| r["targeting_key"] }.transform_values { |rs| rs.sum { |r| r["evaluation_count"] } }
      expect(counts).to eq("parent" => 5, "child" => 7)
      expect(server.rows.size).to eq(2)
      expect(e.stats).to include(recorded: 5, sent: 5)
    end
  end
end
