# frozen_string_literal: true

require "forwardable"

# openfeature-sdk's classes (0.5.1 through 0.6.5), under their own names,
# for specs and `bench/flag_evaluations.rb`: the SDK is not packaged for
# Debian, and the gem does not depend on it. The same members, the same
# kinds of readers (Struct members, Forwardable delegators, attr readers)
# and the same per-call work in them, so the hook is exercised as the SDK
# calls it. Not loaded when the real SDK is.
unless defined?(OpenFeature::SDK::EvaluationDetails)
  module OpenFeature
    module SDK
      module Provider
        EMPTY_FLAG_METADATA = {}.freeze

        # Since 0.6.5 its `flag_metadata` returns a frozen Hash, never nil:
        # a copy when the provider's is not frozen.
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
      end

      # Everything but the flag key is read through `resolution_details`.
      EvaluationDetails = Struct.new(:flag_key, :resolution_details, keyword_init: true) do
        extend Forwardable

        def_delegators :resolution_details, :value, :reason, :variant, :error_code, :error_message, :flag_metadata
      end

      module Hooks
        # Readers, `evaluation_context` writable.
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
      end

      # Fields keyed by String, the targeting key among them.
      class EvaluationContext
        TARGETING_KEY = "targeting_key"

        attr_reader :fields

        def initialize(**fields)
          @fields = fields.transform_keys(&:to_s)
        end

        def targeting_key = fields[TARGETING_KEY]
      end
    end
  end
end

# Short names and builders for the specs.
module SdkShapes
  ResolutionDetails = OpenFeature::SDK::Provider::ResolutionDetails
  EvaluationDetails = OpenFeature::SDK::EvaluationDetails
  HookContext = OpenFeature::SDK::Hooks::HookContext
  EvaluationContext = OpenFeature::SDK::EvaluationContext

  # ResolutionDetails before 0.6.5: a plain Struct, `flag_metadata` may be
  # nil. (Another class than the SDK's here, so the hook reads it through
  # its readers.)
  PlainResolutionDetails = Struct.new(:value, :reason, :variant, :error_code, :error_message, :flag_metadata,
                                      keyword_init: true)

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
