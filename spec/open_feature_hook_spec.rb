# frozen_string_literal: true

require "digest"

RSpec.describe Exporter::OpenFeature::Hook do
  T1 = 1_760_000_000_000

  let(:server) { @server ||= EvpRecorder.new }
  let(:evals) { @evals = Exporter::FlagEvaluations.new(url: server.url, flush_interval: 60) }

  after do
    @evals&.close(timeout: 2)
    @exposures&.close(timeout: 2)
    @server&.close
  end

  def finally(hook, flag:, context:, **details)
    hook.finally(hook_context: SdkShapes.hook_context(flag, context),
                 evaluation_details: SdkShapes.details(flag: flag, **details), hints: {})
  end

  it "counts evaluations, reading metadata and the evaluation context" do
    hook = described_class.new(evaluations: evals)
    ctx = SdkShapes::EvaluationContext.new(targeting_key: "user-1", plan: "pro")
    meta = { "__dd_allocation_key" => "rollout", "__dd_eval_timestamp_ms" => T1 + 7,
             "observe_full_evaluation_data" => true }
    2.times { expect(finally(hook, flag: "f", context: ctx, metadata: meta)).to be_nil }
    finally(hook, flag: "g", context: ctx, metadata: { "allocationKey" => "a2", "dd.eval.timestamp_ms" => T1 })
    expect(evals.flush(timeout: 5)).to be(true)
    f, g = server.rows.sort_by { |r| r["flag"]["key"] }
    expect(f.except("timestamp")).to eq(
      "flag" => { "key" => "f" }, "variant" => { "key" => "on" }, "allocation" => { "key" => "rollout" },
      "targeting_key" => "user-1", "context" => { "evaluation" => { "plan" => "pro" } },
      "first_evaluation" => T1 + 7, "last_evaluation" => T1 + 7, "evaluation_count" => 2
    )
    # No consent: hashed targeting key, no context.
    expect(g.except("timestamp")).to eq(
      "flag" => { "key" => "g" }, "variant" => { "key" => "on" }, "allocation" => { "key" => "a2" },
      "targeting_key" => "sha256_#{Digest::SHA256.hexdigest('user-1')}",
      "first_evaluation" => T1, "last_evaluation" => T1, "evaluation_count" => 1
    )
  end

  [true, false].each do |plain|
    sdk = plain ? "before 0.6.5 (nil)" : "0.6.5 (an empty frozen Hash)"
    it "handles a nil evaluation context, no metadata as the SDK #{sdk} gives it, and FLAG_NOT_FOUND with a nil variant" do
      hook = described_class.new(evaluations: evals)
      details = SdkShapes.details(flag: "missing", variant: nil, error_code: "FLAG_NOT_FOUND",
                                  error_message: "flag missing not found", metadata: nil, plain: plain)
      expect(details.flag_metadata).to(plain ? be_nil : eq({}))
      expect(hook.finally(hook_context: SdkShapes.hook_context("missing", nil), evaluation_details: details)).to be_nil
      expect(evals.flush(timeout: 5)).to be(true)
      row = server.rows.first
      expect(row).to include("flag" => { "key" => "missing" }, "runtime_default_used" => true,
                             "error" => { "message" => "FLAG_NOT_FOUND" }, "evaluation_count" => 1)
      expect(row).not_to have_key("variant")
      expect(row).not_to have_key("targeting_key")
      expect(evals.stats).to include(recorded: 1, sent: 1, hook_failures: 0)
    end
  end

  it "records an exposure when allocation, variant and targeting key are all present" do
    @exposures = Exporter::Exposures.new(url: server.url, flush_interval: 60)
    hook = described_class.new(evaluations: evals, exposures: @exposures)
    ctx = SdkShapes::EvaluationContext.new(targeting_key: "user-9", tier: "gold")
    finally(hook, flag: "f", context: ctx, metadata: { "__dd_allocation_key" => "a1" })
    finally(hook, flag: "f", context: ctx, metadata: nil) # no allocation: no exposure
    finally(hook, flag: "f", context: nil, metadata: { "__dd_allocation_key" => "a1" }) # no targeting key
    expect(@exposures.flush(timeout: 5)).to be(true)
    exposures = server.received.select { |r| r.path.end_with?("/exposures") }
                      .flat_map { |r| JSON.parse(r.body)["exposures"] }
    expect(exposures.map { |x| [x["subject"]["id"], x["subject"]["attributes"]] }).to eq([["user-9", { "tier" => "gold" }]])
    expect(@exposures.stats[:recorded]).to eq(1)
  end

  it "records exposures with the context's fields as attributes, the targeting key left out, duplicates deduplicated" do
    @exposures = Exporter::Exposures.new(url: server.url, flush_interval: 60)
    hook = described_class.new(evaluations: evals, exposures: @exposures)
    meta = { "__dd_allocation_key" => "a1" }
    by_lookup = Object.new # fields that are not a Hash: the exposure has no attributes
    by_lookup.define_singleton_method(:[]) { |k| k == "targeting_key" ? "user-lookup" : nil }
    contexts = {
      "f-sdk" => SdkShapes::EvaluationContext.new(targeting_key: "user-1", plan: "pro", age: 30),
      "f-binary" => Struct.new(:fields).new({ "targeting_key".b => "user-2", "plan" => "free" }),
      "f-lookup" => Struct.new(:fields).new(by_lookup)
    }
    3.times do
      contexts.each do |flag, ctx|
        hook.finally(hook_context: SdkShapes.hook_context(flag, ctx),
                     evaluation_details: SdkShapes.details(flag: flag, metadata: meta))
      end
    end
    expect(@exposures.flush(timeout: 5)).to be(true)
    exposures = server.received.select { |r| r.path.end_with?("/exposures") }
                      .flat_map { |r| JSON.parse(r.body)["exposures"] }
    expect(exposures.to_h { |x| [x["flag"]["key"], [x["subject"]["id"], x["subject"]["attributes"]]] }).to eq(
      "f-sdk" => ["user-1", { "plan" => "pro", "age" => 30 }],
      "f-binary" => ["user-2", { "plan" => "free" }],
      "f-lookup" => ["user-lookup", {}]
    )
    expect(@exposures.stats).to include(recorded: 9, deduplicated: 6)
    expect(evals.stats).to include(recorded: 9, hook_failures: 0)
  end

  it "reads metadata of any size or shape: a falsy key falls back to its alternative" do
    hook = described_class.new(evaluations: evals)
    ctx = SdkShapes::EvaluationContext.new(targeting_key: "user-1", plan: "pro")
    # Read in one pass (small), by lookups (large), and through `[]` (not a Hash).
    small = { "__dd_allocation_key" => nil, "allocationKey" => "a1", "observe_full_evaluation_data" => true }
    large = small.merge((1..20).to_h { |i| ["other-#{i}", i] }, "__dd_eval_timestamp_ms" => T1 + 1)
    lookup = Object.new
    lookup.define_singleton_method(:[]) { |k| { "__dd_allocation_key" => "a3", "dd.eval.timestamp_ms" => T1 + 2 }[k] }
    lookup.freeze # as it is: the SDK (0.6.5) hands on a copy of what is not frozen, and `dup` drops singleton methods
    finally(hook, flag: "small", context: ctx, metadata: small)
    finally(hook, flag: "large", context: ctx, metadata: large)
    finally(hook, flag: "lookup", context: ctx, metadata: lookup)
    # Consent is `true` only; a bad timestamp from a provider is replaced by now.
    finally(hook, flag: "truthy", context: ctx, metadata: { "observe_full_evaluation_data" => "yes",
                                                            "__dd_eval_timestamp_ms" => "soon" })
    expect(evals.flush(timeout: 5)).to be(true)
    rows = server.rows.to_h { |r| [r["flag"]["key"], r] }
    expect(rows["small"]).to include("allocation" => { "key" => "a1" }, "targeting_key" => "user-1",
                                     "context" => { "evaluation" => { "plan" => "pro" } })
    expect(rows["large"]).to include("allocation" => { "key" => "a1" }, "first_evaluation" => T1 + 1,
                                     "targeting_key" => "user-1")
    expect(rows["lookup"]).to include("allocation" => { "key" => "a3" }, "first_evaluation" => T1 + 2,
                                      "targeting_key" => "sha256_#{Digest::SHA256.hexdigest('user-1')}")
    expect(rows["lookup"]).not_to have_key("context")
    expect(rows["truthy"]).not_to have_key("context")
    expect(rows["truthy"]["first_evaluation"]).to be_within(60_000).of((Time.now.to_f * 1000).to_i)
    expect(evals.stats).to include(recorded: 4, hook_failures: 0)
  end

  it "finds the targeting key in fields of any size, as fields[\"targeting_key\"] does" do
    hook = described_class.new(evaluations: evals)
    context = Struct.new(:fields)
    consent = { "observe_full_evaluation_data" => true }
    # Read in one pass (small, a binary String key too) and by lookup (large);
    # a Symbol key is not "targeting_key".
    finally(hook, flag: "small", context: context.new({ "plan" => "pro", "targeting_key".b => "u-small" }),
                  metadata: consent)
    finally(hook, flag: "large", context: context.new((1..20).to_h { |i| ["f#{i}", i] }.merge("targeting_key" => "u-large")),
                  metadata: consent)
    finally(hook, flag: "symbol", context: context.new({ targeting_key: "u-symbol" }), metadata: consent)
    expect(evals.flush(timeout: 5)).to be(true)
    rows = server.rows.to_h { |r| [r["flag"]["key"], r] }
    expect(rows["small"]).to include("targeting_key" => "u-small", "context" => { "evaluation" => { "plan" => "pro" } })
    expect(rows["large"]).to include("targeting_key" => "u-large")
    expect(rows["large"]["context"]["evaluation"]).not_to have_key("targeting_key")
    expect(rows["symbol"]).not_to have_key("targeting_key")
    expect(evals.stats).to include(recorded: 3, hook_failures: 0)
  end

  it "records exposures when evaluation counts are turned off" do
    previous = ENV.fetch("DD_FLAGGING_EVALUATION_COUNTS_ENABLED", nil)
    ENV["DD_FLAGGING_EVALUATION_COUNTS_ENABLED"] = "false"
    disabled = Exporter::FlagEvaluations.new(url: server.url)
    ENV["DD_FLAGGING_EVALUATION_COUNTS_ENABLED"] = previous
    @exposures = Exporter::Exposures.new(url: server.url, flush_interval: 60)
    ctx = SdkShapes::EvaluationContext.new(targeting_key: "user-9", tier: "gold")
    finally(described_class.new(evaluations: disabled, exposures: @exposures), flag: "f", context: ctx,
                                                                                metadata: { "allocationKey" => "a1" })
    expect(@exposures.flush(timeout: 5)).to be(true)
    expect(@exposures.stats[:recorded]).to eq(1)
    expect(disabled.stats).to include(recorded: 0, hook_failures: 0)
  end

  it "takes the keywords of the SDK's Hook#finally, hints optional" do
    hook = described_class.new(evaluations: evals)
    details = SdkShapes.details(flag: "f")
    expect(hook.finally(hook_context: SdkShapes.hook_context("f", nil), evaluation_details: details)).to be_nil
    expect(hook.finally(hook_context: SdkShapes.hook_context("f", nil), evaluation_details: details,
                        hints: { "k" => 1 })).to be_nil
    # openfeature-sdk's own Hook module: the same keywords (as its hook loop passes).
    sdk_finally = ->(hook_context:, evaluation_details:, hints:) { [hook_context, evaluation_details, hints] }
    expect(hook.method(:finally).parameters.map(&:last) - [:hints])
      .to eq(sdk_finally.parameters.map(&:last) - [:hints])
    expect(evals.stats).to include(recorded: 2, hook_failures: 0)
  end

  it "reads the SDK's own objects member by member, and any other object through its readers" do
    hook = described_class.new(evaluations: evals)
    ctx = SdkShapes::EvaluationContext.new(targeting_key: "user-1")
    # The SDK's members, but another class with readers of its own.
    own = Struct.new(:flag_key, :resolution_details) do
      def variant = "own-#{resolution_details.variant}"
      def error_code = nil
      def error_message = nil
      def flag_metadata = { "__dd_allocation_key" => "own-alloc" }
    end
    flat = Struct.new(:flag_key, :variant, :error_code, :error_message, :flag_metadata)
    subclass = Class.new(SdkShapes::EvaluationDetails) { def variant = "sub" }
    basic = BasicObject.new # duck-typed, without even #class
    class << basic
      def flag_key = "basic"
      def variant = "v5"
      def error_code = nil
      def error_message = nil
      def flag_metadata = { "allocationKey" => "a5" }
    end
    # Unfrozen metadata: the SDK (0.6.5) would hand over a frozen copy; the member is read.
    sdk = SdkShapes.details(flag: "sdk", variant: "v1", metadata: { "__dd_allocation_key" => "a1" })
    singleton = SdkShapes.details(flag: "singleton", variant: "v1", metadata: { "__dd_allocation_key" => "a1" })
    def singleton.variant = "overridden"
    call = ->(flag, details) { hook.finally(hook_context: SdkShapes.hook_context(flag, ctx), evaluation_details: details) }
    call.("sdk", sdk) # learns the SDK's classes through their readers
    # Known now: not one reader of the SDK's objects is called.
    readers = %i[flag_key resolution_details variant error_code error_message flag_metadata]
    readers.each { |m| expect_any_instance_of(SdkShapes::EvaluationDetails).not_to receive(m) }
    %i[variant error_code error_message flag_metadata].each do |m|
      expect_any_instance_of(SdkShapes::ResolutionDetails).not_to receive(m)
    end
    call.("sdk", sdk)
    RSpec::Mocks.space.reset_all
    # Each shape after another: what the hook knows must not leak between them.
    2.times do
      call.("own", own.new("own", sdk.resolution_details))
      call.("flat", flat.new("flat", "v3", nil, nil, { "allocationKey" => "a3" }))
      call.("sub", subclass.new(flag_key: "sub", resolution_details: sdk.resolution_details))
      call.("singleton", singleton)
      call.("plain", SdkShapes.details(flag: "plain", variant: "v4", metadata: { "allocationKey" => "a4" }, plain: true))
      call.("basic", basic)
      call.("sdk", sdk)
    end
    expect(evals.flush(timeout: 5)).to be(true)
    rows = server.rows.to_h { |r| [r["flag"]["key"], r] }
    expect(rows.transform_values { |r| [r["variant"]["key"], r["allocation"]["key"], r["evaluation_count"]] }).to eq(
      "sdk" => ["v1", "a1", 4], "own" => ["own-v1", "own-alloc", 2], "flat" => ["v3", "a3", 2],
      "sub" => ["sub", "a1", 2], "singleton" => ["overridden", "a1", 2], "plain" => ["v4", "a4", 2],
      "basic" => ["v5", "a5", 2]
    )
    expect(evals.stats).to include(recorded: 16, hook_failures: 0)
  end

  it "reads members natively only from Structs of the classes and sizes it was given" do
    small = Struct.new(:flag_key)
    two = Struct.new(:flag_key, :resolution_details)
    resolution = SdkShapes::ResolutionDetails.new(variant: "on")
    # Not read (false): nothing recorded, whatever is passed.
    [[small.new("f"), small, SdkShapes::ResolutionDetails],
     [two.new("f", resolution), small, SdkShapes::ResolutionDetails],
     [two.new("f", two.new("x", "y")), two, two], # a resolution of 2 members, not 6
     [two.new("f", resolution), two, nil],
     [nil, nil, nil], [1, Integer, Integer], ["text", String, String], [two, Class, Class]].each do |details, dk, rk|
      expect(evals._record_sdk(details, dk, rk, nil, nil)).to be(false)
    end
    expect(evals._record_sdk(two.new("f", resolution), two, SdkShapes::ResolutionDetails, nil, nil)).to be_nil
    expect(evals.stats).to include(recorded: 1)
  end

  it "never raises into the application: failures are counted" do
    hook = described_class.new(evaluations: evals)
    broken = Object.new
    def broken.flag_metadata = raise("provider bug")
    expect(hook.finally(hook_context: SdkShapes.hook_context("f", nil), evaluation_details: broken)).to be_nil
    expect(finally(hook, flag: nil, context: nil)).to be_nil # a nil flag key raises inside: counted
    expect(evals.stats).to include(hook_failures: 2, recorded: 0)
    expect(evals.stats[:last_error]).to include("OpenFeature hook failed")
  end

  it "checks its arguments" do
    expect { described_class.new(evaluations: nil) }.to raise_error(ArgumentError, /evaluations/)
    expect { described_class.new(evaluations: evals, exposures: 1) }.to raise_error(ArgumentError, /exposures/)
  end
end
