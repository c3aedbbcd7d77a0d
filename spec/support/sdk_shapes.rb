# frozen_string_literal: true

require "forwardable"

# Objects shaped like openfeature-sdk's (0.5.1 through 0.6.5), without the
# SDK (it is not packaged for Debian): the same classes, the same kinds of
# accessors (Struct members, Forwardable delegators, attr readers), and the
# same per-call work in them, so that specs and `bench/flag_evaluations.rb`
# exercise the hook as the SDK calls it.
module SdkShapes
  EMPTY_FLAG_METADATA = {}.freeze

  # Provider::ResolutionDetails. Since 0.6.5 its `flag_metadata` returns a
  # frozen Hash, never nil: a copy when the provider's is not frozen.
  ResolutionDetails = Struct.new(:value, :reason, :variant, :error_code, :error_message, :flag_metadata,
                                 keyword_init: true) do
    def flag_metadata
      raw = self[:flag_metadata]
      if raw.nil? then EMPTY_FLAG_METADATA
      elsif raw.frozen? then raw
      else raw.dup.freeze
      end
    end
  end

  # ResolutionDetails before 0.6.5: a plain Struct, `flag_metadata` may be
  # nil.
  PlainResolutionDetails = Struct.new(:value, :reason, :variant, :error_code, :error_message, :flag_metadata,
                                      keyword_init: true)

  # EvaluationDetails: everything but the flag key is read through
  # `resolution_details`.
  EvaluationDetails = Struct.new(:flag_key, :resolution_details, keyword_init: true) do
    extend Forwardable

    def_delegators :resolution_details, :value, :reason, :variant, :error_code, :error_message, :flag_metadata
  end

  # Hooks::HookContext: a class with readers, `evaluation_context` writable.
  class HookContext
    attr_reader :flag_key, :flag_value_type, :default_value
    attr_accessor :evaluation_context

    def initialize(flag_key:, flag_value_type:, default_value:, evaluation_context:)
      @flag_key = flag_key.freeze
      @flag_value_type = flag_value_type.freeze
      @default_value = default_value.freeze
      @evaluation_context = evaluation_context
    end
  end

  # EvaluationContext: fields keyed by String, the targeting key among them.
  class EvaluationContext
    attr_reader :fields

    def initialize(**fields)
      @fields = fields.transform_keys(&:to_s)
    end

    def targeting_key = fields["targeting_key"]
  end

  # `plain: true` for the ResolutionDetails of releases before 0.6.5.
  def self.details(flag:, variant: "on", error_code: nil, error_message: nil, metadata: nil, plain: false)
    EvaluationDetails.new(flag_key: flag, resolution_details: (plain ? PlainResolutionDetails : ResolutionDetails).new(
      value: true, reason: "TARGETING_MATCH", variant: variant, error_code: error_code,
      error_message: error_message, flag_metadata: metadata
    ))
  end

  def self.hook_context(flag, context)
    HookContext.new(flag_key: flag, flag_value_type: :boolean, default_value: false, evaluation_context: context)
  end
end
