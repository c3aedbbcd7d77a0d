# frozen_string_literal: true

RSpec.describe Exporter::Exposures do
  let(:agent) { TestAgent.shared.clear }

  def exposures(**opts)
    @exposures = described_class.new(url: agent.url, flush_interval: 60, **opts)
  end

  after { @exposures&.close }

  def record(e, flag: "checkout", subject: "user-1", variant: "on", allocation: "rollout", **rest)
    e.record(flag: flag, allocation: allocation, variant: variant, subject_id: subject, **rest)
  end

  it "posts the intake's payload shape with the EVP headers" do
    e = exposures(service: "shop", env: "", version: "1.2.3")
    expect(record(e, subject_attributes: { "plan" => "pro", age: 30, "ratio" => 0.5, "beta" => true,
                                           "tags" => %w[a], "nothing" => nil },
                     timestamp_ms: 1_700_000_000_123)).to be(true)
    expect(e.flush(timeout: 5)).to be(true)
    (headers, body), *rest = agent.exposure_requests
    expect(rest).to be_empty
    expect(headers).to include("content-type" => "application/json",
                               "x-datadog-evp-subdomain" => "event-platform-intake")
    expect(body).to eq(
      "context" => { "service" => "shop", "version" => "1.2.3" },
      "exposures" => [{
        "timestamp" => 1_700_000_000_123,
        "allocation" => { "key" => "rollout" }, "flag" => { "key" => "checkout" }, "variant" => { "key" => "on" },
        "subject" => { "id" => "user-1", "attributes" => { "plan" => "pro", "age" => 30, "ratio" => 0.5, "beta" => true } }
      }]
    )
    expect(e.stats).to include(recorded: 1, deduplicated: 0, sent: 1, attributes_dropped: 2, dropped: 0, failed: 0)
  end

  it "deduplicates: A, A, B, A sends three events" do
    e = exposures
    results = %w[A A B A].map { |v| record(e, variant: v) }
    expect(results).to eq([true, false, true, true])
    expect(e.flush(timeout: 5)).to be(true)
    expect(agent.exposures.map { |x| x["variant"]["key"] }).to eq(%w[A B A])
    expect(e.stats).to include(recorded: 4, deduplicated: 1, sent: 3)
  end

  it "re-sends a key evicted from the LRU" do
    e = exposures(dedup_cache_size: 2)
    %w[u1 u2 u1 u3 u1 u2].each { |s| record(e, subject: s) }
    expect(e.flush(timeout: 5)).to be(true)
    # u1 stays recent; u2 is evicted by u3, so its second exposure is sent.
    expect(agent.exposures.map { |x| x["subject"]["id"] }).to eq(%w[u1 u2 u3 u2])
  end

  it "drops and counts a burst larger than the buffer, and loses nothing else" do
    slow = ScriptedServer.new { [:sleep, 0.3, [202, {}, "{}"]] }
    e = described_class.new(url: slow.url, buffer_size: 10, flush_interval: 60)
    results = (1..50).map { |i| record(e, subject: "s#{i}") }
    dropped = results.count(false)
    expect(dropped).to be >= 40 - 10 # at most one buffer queued + a batch in flight
    expect(e.flush(timeout: 10)).to be(false)
    expect(e.stats).to include(recorded: 50, dropped: dropped, sent: 50 - dropped, failed: 0, queued: 0)
    got = slow.received.flat_map { |r| JSON.parse(r.body)["exposures"] }.map { |x| x["subject"]["id"] }
    expect(got).to eq((1..50).select.with_index { |_, i| results[i] }.map { |i| "s#{i}" })
    # A dropped exposure is not remembered as sent: recording it again works.
    expect(record(e, subject: "s50")).to be(true)
    e.close
  ensure
    slow&.close
  end

  it "splits requests under the payload cap" do
    e = exposures(max_payload_size: 4_096)
    200.times { |i| record(e, subject: "subject-#{i}", subject_attributes: { "pad" => "x" * 50 }) }
    expect(e.flush(timeout: 10)).to be(true)
    reqs = agent.requests.select { |r| r["url"].include?("exposures") }
    expect(reqs.size).to be > 1
    expect(reqs.map { |r| Base64.decode64(r["body"]).bytesize }.max).to be <= 4_096
    expect(agent.exposures.size).to eq(200)
  end

  it "raises ArgumentError naming a missing or non-String field" do
    e = exposures
    expect { e.record(allocation: "a", variant: "v", subject_id: "s") }.to raise_error(ArgumentError, /flag/)
    expect { e.record(flag: 1, allocation: "a", variant: "v", subject_id: "s") }
      .to raise_error(ArgumentError, /flag must be a String/)
    expect { e.record(flag: "f", allocation: :a, variant: "v", subject_id: "s") }
      .to raise_error(ArgumentError, /allocation must be a String/)
    expect { e.record(flag: "f", allocation: "a", variant: nil, subject_id: "s") }
      .to raise_error(ArgumentError, /variant must be a String/)
    expect(e.record(flag: "f", allocation: "a", variant: "v", subject_id: "")).to be(true)
    expect(e.stats).to include(recorded: 1)
  end

  describe "across fork" do
    it "the child's exposures arrive, the child does not resend the parent's, the parent's still arrive" do
      e = exposures
      record(e, subject: "parent-1")
      status = fork_and_wait do
        raise "child inherited a queue: #{e.stats}" unless e.stats[:queued].zero?
        # The dedup cache is empty in the child: the same assignment is new here.
        raise "child deduplicated" unless record(e, subject: "parent-1") == true

        record(e, subject: "child-1")
        raise "child flush failed" unless e.flush(timeout: 5)
      end
      expect(status).to be_success
      record(e, subject: "parent-2")
      expect(e.flush(timeout: 5)).to be(true)
      ids = eventually_via_sidecar { (got = agent.exposures).size >= 4 && got }.map { |x| x["subject"]["id"] }
      expect(ids.sort).to eq(%w[child-1 parent-1 parent-1 parent-2])
      expect(e.stats).to include(sent: 2, recorded: 2)
    end

    it "flushes at exit in a short-lived process" do
      script = <<~RUBY
        require "exporter"
        e = Exporter::Exposures.new(url: #{agent.url.inspect}, flush_interval: 60)
        3.times { |i| e.record(flag: "f", allocation: "a", variant: "v", subject_id: "exit-\#{i}") }
      RUBY
      pid = Process.spawn(ruby_bin, "-I", lib_dir, "-e", script)
      expect(wait_bounded(pid, timeout: 20)).to be_success
      expect(agent.exposures.map { |x| x["subject"]["id"] }).to eq(%w[exit-0 exit-1 exit-2])
    end
  end
end
