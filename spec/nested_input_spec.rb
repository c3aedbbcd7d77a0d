# frozen_string_literal: true

# Nested input (meta_struct, span link and event attributes, exposure
# attributes) is walked with a depth limit and cycle detection: cyclic and
# 100,000-deep structures raise InvalidTraceError naming trace, span and
# field (exposures leave non-primitive attributes out and count them), and
# no Ruby value makes conversion raise anything else, crash or hang.
RSpec.describe "Nested and hostile input" do
  # Nothing is ever sent: conversion happens before the writer queues.
  let(:transport) { Exporter::Transport.new(url: "http://127.0.0.1:9") }
  let(:writer) { Exporter::Writer.new(transport: transport, buffer_size: 100_000, flush_interval: 3600) }

  after do
    writer.stop(timeout: 0.1)
    transport.close
  end

  def span(**over)
    { trace_id: 1, span_id: 1, name: "x" }.merge(over)
  end

  def deep_hash(levels) = (1..levels).reduce({}) { |inner, _| { "a" => inner } }
  def deep_array(levels) = (1..levels).reduce([]) { |inner, _| [inner] }

  def cyclic_hash = {}.tap { |h| h["self"] = h }
  def cyclic_array = [].tap { |a| a << a }

  def convert(trace) = writer.write(trace)

  describe "meta_struct" do
    it "raises InvalidTraceError for a cyclic Hash" do
      expect { convert([span, span(meta_struct: { "appsec" => cyclic_hash })]) }
        .to raise_error(Exporter::InvalidTraceError, /trace 0, span 1: meta_struct \["appsec"\] \["self"\] is cyclic/)
    end

    it "raises InvalidTraceError for a cyclic Array, and a cycle through a Hash and an Array" do
      expect { convert([span(meta_struct: { "a" => { "list" => cyclic_array } })]) }
        .to raise_error(Exporter::InvalidTraceError, /meta_struct \["a"\] \["list"\] \[0\] is cyclic/)
      h = { "x" => [1, 2] }
      h["x"] << { "back" => h }
      expect { convert([span(meta_struct: { "a" => h })]) }
        .to raise_error(Exporter::InvalidTraceError, /meta_struct \["a"\] .*is cyclic/)
    end

    it "raises InvalidTraceError for 100,000-deep Hashes and Arrays" do
      expect { convert([span(meta_struct: { "deep" => deep_hash(100_000) })]) }
        .to raise_error(Exporter::InvalidTraceError, /trace 0, span 0: meta_struct \["deep"\] .*nests deeper than 100 levels/)
      expect { convert([span(meta_struct: { "deep" => { "a" => deep_array(100_000) } })]) }
        .to raise_error(Exporter::InvalidTraceError, /nests deeper than 100 levels/)
    end

    it "accepts exactly 100 levels and the same object twice (shared, not cyclic)" do
      expect(convert([span(meta_struct: { "ok" => deep_hash(99) })])).to be(true)
      shared = { "k" => [1, "two", 3.0, nil, true, :sym] }
      expect(convert([span(meta_struct: { "ok" => { "a" => shared, "b" => shared, "c" => [shared, shared] } })]))
        .to be(true)
      expect { convert([span(meta_struct: { "deep" => deep_hash(100) })]) }
        .to raise_error(Exporter::InvalidTraceError, /nests deeper than 100 levels/)
    end

    it "stops a value that shares sub-structures exponentially, in bounded time" do
      x = ["x" * 64]
      40.times { x = [x, x] } # 2**40 leaves if walked naively
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect { convert([span(meta_struct: { "dag" => { "x" => x } })]) }
        .to raise_error(Exporter::InvalidTraceError, /meta_struct \["dag"\] .*is over 32 MiB encoded/)
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0).to be < 10
    end

    it "encodes what it accepts exactly" do
      agent = TestAgent.shared.clear
      t = Exporter::Transport.new(url: agent.url)
      value = { "a" => [1, -2, 2**64 - 1, -(2**63), 1.5, nil, true, false, "s", :sym, { "n" => {} }],
                sym: "\xff".b, "bin".b => "é".encode("ISO-8859-1") }
      expect(t.send_traces([[SpanFactory.span(trace_id: 5, span_id: 5, meta_struct: { "v" => value })]])).to be_ok
      got = agent.traces.flatten.first["meta_struct"]["v"]
      got = MessagePack.unpack(got) if got.is_a?(String)
      expect(got).to eq(
        "a" => [1, -2, 2**64 - 1, -(2**63), 1.5, nil, true, false, "s", "sym", { "n" => {} }],
        "sym" => "\uFFFD", "bin" => "é"
      )
    ensure
      t&.close
    end
  end

  describe "span Hashes of every table shape, many to a trace" do
    # Conversion reads a trace's spans ahead of the one converted (their
    # tables and what they hold): every shape a span Hash can have, at
    # every position, must read the same as alone.
    def shaped(i)
      s = SpanFactory.span(trace_id: 7, span_id: 1000 + i, meta: { "i" => i.to_s })
      case i % 6
      when 0 then s.slice(:trace_id, :span_id, :name) # an array table
      when 1 # an st table with deleted entries, meta too
        s.merge!((1..12).to_h { |k| [:"extra#{k}", k] }).merge!(meta: (1..20).to_h { |k| ["k#{k}", "v#{k}"] })
        (1..12).each { |k| s.delete(:"extra#{k}") unless k == 5 }
        s[:meta].delete("k3")
        s[:meta]["i"] = i.to_s
        s
      when 2 then s.compare_by_identity
      when 3 then s.merge(meta: {}, metrics: {}).freeze
      when 4 then s.merge(trace_id: 2**100 + 7, parent_id: 2**63 + i) # Bignums
      else s.merge(meta: nil, metrics: nil, resource: "r" * 300)
      end
    end

    it "converts each as it would alone" do
      agent = TestAgent.shared.clear
      t = Exporter::Transport.new(url: agent.url)
      trace = Array.new(40) { |i| shaped(i) }
      expect(t.send_traces([trace])).to be_ok
      got = agent.spans.sort_by { |sp| sp["span_id"] }
      expect(got.map { |sp| sp["span_id"] }).to eq((1000...1040).to_a)
      got.each_with_index do |sp, i|
        expect(sp["meta"]["i"]).to eq(i.to_s) if [1, 2, 4].include?(i % 6)
        expect(sp["meta"]).not_to have_key("k3") if i % 6 == 1
        expect(sp["meta"]["k20"]).to eq("v20") if i % 6 == 1
        expect(sp["parent_id"]).to eq(2**63 + i) if i % 6 == 4
        expect(sp["resource"]).to eq("r" * 300) if i % 6 == 5
      end
    ensure
      t&.close
    end

    it "names the first span that is not one, wherever the others are" do
      [0, 3, 17, 38].each do |bad|
        [nil, 5, "span", [1], Object.new, {}].each do |odd|
          trace = Array.new(40) { |i| i == bad ? odd : shaped(i) }
          expect { convert(trace) }.to raise_error(Exporter::InvalidTraceError, /trace 0, span #{bad}: /)
        end
      end
    end
  end

  describe "span events and links" do
    it "refuses nested or cyclic event attribute values" do
      event = ->(v) { span(span_events: [{ name: "e", time_unix_nano: 1, attributes: { "k" => v } }]) }
      expect { convert([event.(cyclic_array)]) }
        .to raise_error(Exporter::InvalidTraceError, /span_events \[0\] attributes \["k"\] nests an Array in an Array/)
      expect { convert([event.(deep_array(100_000))]) }
        .to raise_error(Exporter::InvalidTraceError, /span_events \[0\] attributes \["k"\] nests an Array/)
      expect { convert([event.(cyclic_hash)]) }
        .to raise_error(Exporter::InvalidTraceError, /attributes \["k"\] must be a String, Integer/)
      expect { convert([event.(deep_hash(100_000))]) }
        .to raise_error(Exporter::InvalidTraceError, /attributes \["k"\] must be a String, Integer/)
      expect { convert([event.([1, [2]])]) }.to raise_error(Exporter::InvalidTraceError, /nests an Array in an Array/)
      expect(convert([event.([1, 2.5, "s", true])])).to be(true)
    end

    it "refuses nested or cyclic link attribute values" do
      link = ->(v) { span(span_links: [{ trace_id: 1, span_id: 2, attributes: { "k" => v } }]) }
      [cyclic_hash, cyclic_array, deep_hash(100_000), deep_array(100_000)].each do |v|
        expect { convert([link.(v)]) }
          .to raise_error(Exporter::InvalidTraceError, /trace 0, span 0: span_links \[0\] attributes \["k"\] must be a String/)
      end
    end

    it "refuses a cyclic or deep span_links / span_events list itself" do
      expect { convert([span(span_links: cyclic_array)]) }
        .to raise_error(Exporter::InvalidTraceError, /span_links \[0\] must be a Hash \(got Array\)/)
      expect { convert([span(span_events: deep_array(100_000))]) }
        .to raise_error(Exporter::InvalidTraceError, /span_events \[0\] must be a Hash \(got Array\)/)
    end
  end

  describe "Exposures#record subject_attributes" do
    let(:exposures) { Exporter::Exposures.new(url: "http://127.0.0.1:9", flush_interval: 3600) }

    after { exposures.close(timeout: 0.1) }

    it "leaves cyclic and 100,000-deep values out and counts them" do
      attrs = { "c" => cyclic_hash, "a" => cyclic_array, "dh" => deep_hash(100_000), "da" => deep_array(100_000),
                "ok" => "yes" }
      attrs["self"] = attrs
      expect(exposures.record(flag: "f", allocation: "a", variant: "v", subject_id: "u", subject_attributes: attrs))
        .to be(true)
      expect(exposures.stats).to include(recorded: 1, attributes_dropped: 5)
    end

    it "raises ArgumentError naming subject_attributes when it is not a Hash" do
      [cyclic_array, deep_array(100_000), "x", 1].each do |v|
        expect { exposures.record(flag: "f", allocation: "a", variant: "v", subject_id: "u", subject_attributes: v) }
          .to raise_error(ArgumentError, /subject_attributes must be a Hash/)
      end
    end
  end

  describe "randomized input", timeout: 120 do
    FUZZ_SEED_VALUE = Integer(ENV.fetch("FUZZ_SEED", "20_240_611"))
    FUZZ_COUNT = Integer(ENV.fetch("FUZZ_CASES", "4000"))

    FuzzPoint = Struct.new(:x, :y)

    # Built once: deep values are costly to make, not to refuse.
    let(:deep) { [deep_hash(100_000), deep_array(100_000), deep_hash(101), deep_array(99)] }

    def scalars(rng)
      [
        nil, true, false, 0, 1, -1, rng.rand(2**62), -rng.rand(2**62), (2**62) - 1, 2**62, (2**64) - 1, 2**64,
        (2**128) - 1, 2**128, -(2**64), -(2**200), 7**4000, rng.rand(2**64), rng.rand(2**128),
        0.0, -0.0, 1.5, Float::NAN, Float::INFINITY, -Float::INFINITY, Float::MAX, Float::MIN, Float::EPSILON,
        Rational(1, 3), Complex(1, 2), 1r, Time.at(0), Object.new, BasicObject.new, FuzzPoint.new(1, 2), (1..3),
        (1..), Class, Kernel, Encoding::UTF_8, -> {}, method(:puts), :sym, :"with space", "\xff".b.to_sym,
        "", "ascii", "é utf-8", "\u0000\u0001\u001f\u007f ctl", "\xff\xfe invalid".b,
        (+"\xff\xfe invalid").force_encoding(Encoding::UTF_8), "é latin1".encode("ISO-8859-1"),
        "日本語".encode("Shift_JIS"), "utf16".encode("UTF-16LE"), (+"dummy").force_encoding("UTF-16"),
        "x" * rng.rand(1..300_000), "frozen".freeze, String.new("unfrozen"), Class.new(String).new("subclass"),
        "\u{1F600} emoji", "a\u0000b"
      ]
    end

    # Strings of every kind, numbers of every size: what a meta, metrics or
    # attribute value could plausibly be (many still out of range).
    def plausible(rng)
      scalars(rng).select { |v| [String, Numeric, TrueClass, FalseClass, NilClass].any? { |c| c === v } } # rubocop:disable Style/CaseEquality
                  .sample(random: rng)
    end

    def random_value(rng, depth = 0)
      pick = rng.rand(100)
      return scalars(rng).sample(random: rng) if pick < 40 || depth > 4
      return plausible(rng) if pick < 55

      case pick
      when 55..69 then Array.new(rng.rand(0..6)) { random_value(rng, depth + 1) }
      when 70..84
        Array.new(rng.rand(0..6)) { [random_key(rng), random_value(rng, depth + 1)] }.to_h
      when 85..88 then cyclic_hash
      when 89..91 then cyclic_array
      when 92..95 then deep.sample(random: rng)
      when 96 then Class.new(Hash)[random_key(rng) => random_value(rng, depth + 1)]
      when 97 then {}.compare_by_identity.tap { |h| h[random_key(rng)] = 1 }
      when 98 then Hash.new { |h, k| h[k] = k }.tap { |h| h["k"] = "v" }
      else { "k" => random_value(rng, depth + 1) }.freeze
      end
    end

    def random_key(rng)
      pick = rng.rand(10)
      if pick.zero? # any scalar that can be a Hash key, most not a String or Symbol
        k = random_value(rng, 5)
        return Object === k ? k : 1.5 # rubocop:disable Style/CaseEquality (a BasicObject has no #hash)
      end

      %w[k key http.url _dd.p.tid].sample(random: rng).then { |k| pick.odd? ? k.to_sym : k }
    end

    FUZZ_FIELDS = %i[trace_id span_id parent_id name service resource type start duration error meta metrics
                meta_struct span_links span_events].freeze

    def structured(rng, field)
      v = -> { rng.rand(3).zero? ? random_value(rng) : plausible(rng) }
      case field
      when :meta, :metrics then Array.new(rng.rand(0..4)) { [random_key(rng), v.()] }.to_h
      when :meta_struct then Array.new(rng.rand(0..3)) { [random_key(rng), { "x" => random_value(rng) }] }.to_h
      when :span_links
        [{ trace_id: rng.rand(1..2**128), span_id: rng.rand(2**64), attributes: { random_key(rng) => v.() },
           tracestate: v.(), flags: v.() }]
      when :span_events
        [{ name: v.(), time_unix_nano: rng.rand(2**64), attributes: { random_key(rng) => v.() } }]
      else v.()
      end
    end

    def random_span(rng)
      s = SpanFactory.span(trace_id: rng.rand(1..2**128), span_id: rng.rand(1..2**64 - 1))
      (rng.rand(2).zero? ? 0 : rng.rand(1..2)).times do
        field = FUZZ_FIELDS.sample(random: rng)
        key = rng.rand(4).zero? ? field.to_s : field
        s[key] = rng.rand(3).zero? ? random_value(rng) : structured(rng, field)
      end
      s[random_key(rng)] = random_value(rng) if rng.rand(10).zero?
      s
    end

    def random_trace(rng)
      case rng.rand(20)
      when 0 then random_value(rng)
      when 1 then [random_span(rng), random_value(rng)]
      else Array.new(rng.rand(1..3)) { random_span(rng) }
      end
    end

    it "raises only InvalidTraceError (Writer#write, Transport#send_traces) and ArgumentError (Exposures), " \
       "in bounded time" do
      rng = Random.new(FUZZ_SEED_VALUE)
      exposures = Exporter::Exposures.new(url: "http://127.0.0.1:9", flush_interval: 3600, buffer_size: 100_000)
      outcomes = Hash.new(0)
      slowest = 0.0
      FUZZ_COUNT.times do |i|
        trace = random_trace(rng)
        args = %i[flag allocation variant subject_id].to_h { |k| [k, rng.rand(8).zero? ? random_value(rng) : "s#{i}"] }
        attrs = rng.rand(4).zero? ? random_value(rng) : Array.new(rng.rand(0..5)) { [random_key(rng), random_value(rng)] }.to_h
        t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        begin
          outcomes[writer.write(trace) ? :written : :dropped] += 1
        rescue Exporter::InvalidTraceError
          outcomes[:invalid] += 1
        rescue Exception => e # rubocop:disable Lint/RescueException
          raise "case #{i} (FUZZ_SEED=#{FUZZ_SEED_VALUE}): Writer#write raised #{e.class}: #{e.message[0, 300]}"
        end
        begin
          exposures.record(**args, subject_attributes: attrs)
          outcomes[:recorded] += 1
        rescue ArgumentError
          outcomes[:argument_error] += 1
        rescue Exception => e # rubocop:disable Lint/RescueException
          raise "case #{i} (FUZZ_SEED=#{FUZZ_SEED_VALUE}): Exposures#record raised #{e.class}: #{e.message[0, 300]}"
        end
        slowest = [slowest, Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0].max
      end
      exposures.close(timeout: 0.1)
      # The input really is mixed: plenty of both outcomes on both APIs.
      expect(outcomes.values_at(:written, :invalid, :recorded, :argument_error)).to all(be > FUZZ_COUNT / 20)
      expect(slowest).to be < 2.0
    end

    it "raises only InvalidTraceError from Transport#send_traces for whole batches" do
      rng = Random.new(FUZZ_SEED_VALUE + 1)
      invalid = 0
      # Closed: batches that convert come back as a failed Response.
      closed = Exporter::Transport.new(url: "http://127.0.0.1:9").tap(&:close)
      300.times do |i|
        batch = rng.rand(10).zero? ? random_value(rng) : Array.new(rng.rand(1..3)) { random_trace(rng) }
        begin
          expect(closed.send_traces(batch)).to be_a(Exporter::Response)
        rescue Exporter::InvalidTraceError
          invalid += 1
        rescue Exception => e # rubocop:disable Lint/RescueException
          raise "batch #{i} (FUZZ_SEED=#{FUZZ_SEED_VALUE}): send_traces raised #{e.class}: #{e.message[0, 300]}"
        end
      end
      expect(invalid).to be > 30
    end
  end
end
