# frozen_string_literal: true

module Exporter
  module OpenFeature
    # An OpenFeature Ruby SDK hook (openfeature-sdk >= 0.5.1; this file does
    # not require the SDK) that counts every flag evaluation in
    # `evaluations` (an Exporter::FlagEvaluations) and, when `exposures` is
    # given, records an exposure for evaluations that have an allocation, a
    # variant and a targeting key (the subject's attributes: the context's
    # fields but the targeting key).
    #
    #   hook = Exporter::OpenFeature::Hook.new(evaluations: evals, exposures: exposures)
    #   OpenFeature::SDK.configure { |c| c.hooks << hook }   # every client
    #   client.hooks << hook                                  # or one client
    #
    # Only `finally` is implemented. It reads the flag key, variant, error
    # code and message and `flag_metadata` from `evaluation_details`, and the
    # targeting key and fields from `hook_context.evaluation_context` (either
    # may be nil); the extension reads the metadata and the fields (it holds
    # the metadata keys: `__dd_allocation_key` or `allocationKey`,
    # `__dd_eval_timestamp_ms` or `dd.eval.timestamp_ms`,
    # `observe_full_evaluation_data`) and records the evaluation and the
    # exposure, in one call. It only captures, on the caller's thread; it
    # never raises into the application: a failure is counted in
    # `evaluations.stats[:hook_failures]` and logged once.
    class Hook
      # The SDK's own classes (0.5.1 through 0.6.5), by name and members:
      # their instances are read by the extension, member by member, where
      # the SDK's readers would return the same values at a cost (its
      # EvaluationDetails delegates five of them to `resolution_details`
      # through Forwardable, ~150 ns a call). Any other object, or a
      # future SDK whose classes differ, is read through its readers.
      SDK_CLASSES = {
        details: ["OpenFeature::SDK::EvaluationDetails", %i[flag_key resolution_details].freeze].freeze,
        resolution: ["OpenFeature::SDK::Provider::ResolutionDetails",
                     %i[value reason variant error_code error_message flag_metadata].freeze].freeze
      }.freeze

      attr_reader :evaluations, :exposures

      def initialize(evaluations:, exposures: nil)
        raise ArgumentError, "evaluations must be an Exporter::FlagEvaluations" unless evaluations.is_a?(FlagEvaluations)
        if exposures && !exposures.is_a?(Exposures)
          raise ArgumentError, "exposures must be an Exporter::Exposures or nil"
        end

        @evaluations = evaluations
        @exposures = exposures
        @details_class = nil    # the SDK's EvaluationDetails, once seen
        @resolution_class = nil # and its Provider::ResolutionDetails
      end

      # The keywords of the SDK's own `OpenFeature::SDK::Hooks::Hook#finally`,
      # which every release with hooks (0.5.1 through 0.6.5) passes, no more:
      # `hints:` is ignored (optional here). Not `**`: that is a Hash per
      # call (~730 instructions).
      def finally(hook_context:, evaluation_details:, hints: nil)
        fields = hook_context.evaluation_context&.fields
        # nil: recorded; false: not the SDK's objects (or not known yet), read here.
        unless @evaluations._record_sdk(evaluation_details, @details_class, @resolution_class, fields, @exposures).nil?
          read(evaluation_details, fields)
        end
        nil
      rescue StandardError => e
        @evaluations._hook_failed("#{e.class}: #{e.message}")
        nil
      end

      private

      def read(details, fields)
        learn(details)
        @evaluations._record_hook(details.flag_metadata, fields, details.flag_key, details.variant,
                                  details.error_code, details.error_message, @exposures)
      end

      # Remembers the SDK's classes when `details` is one of its
      # EvaluationDetails holding one of its ResolutionDetails. (`Struct ===`
      # first: a duck-typed BasicObject has not even `#class`.)
      def learn(details)
        return unless Struct === details && sdk_class?(details.class, *SDK_CLASSES[:details])

        resolution = details.resolution_details
        return unless Struct === resolution && sdk_class?(resolution.class, *SDK_CLASSES[:resolution])

        @resolution_class = resolution.class
        @details_class = details.class
      end

      def sdk_class?(klass, name, members)
        klass.name == name && klass.members == members
      end
    end
  end
end
