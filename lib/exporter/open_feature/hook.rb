# frozen_string_literal: true

module Exporter
  module OpenFeature
    # An OpenFeature Ruby SDK hook (openfeature-sdk >= 0.5.1; this file does
    # not require the SDK) that counts every flag evaluation in
    # `evaluations` (an Exporter::FlagEvaluations) and, when `exposures` is
    # given, records an exposure for evaluations that have an allocation, a
    # variant and a targeting key.
    #
    #   hook = Exporter::OpenFeature::Hook.new(evaluations: evals, exposures: exposures)
    #   OpenFeature::SDK.configure { |c| c.hooks << hook }   # every client
    #   client.hooks << hook                                  # or one client
    #
    # Only `finally` is implemented. It reads the flag key, variant, error
    # code and message and `flag_metadata` from `evaluation_details`, and the
    # targeting key and fields from `hook_context.evaluation_context` (either
    # may be nil); `FlagEvaluations#_record_hook` reads the metadata and the
    # fields natively (it holds the metadata keys: `__dd_allocation_key` or
    # `allocationKey`, `__dd_eval_timestamp_ms` or `dd.eval.timestamp_ms`,
    # `observe_full_evaluation_data`) and records, in one call. It only captures, on the caller's
    # thread; it never raises into the application: a failure is counted in
    # `evaluations.stats[:hook_failures]` and logged once.
    class Hook
      TARGETING_KEY = "targeting_key"

      attr_reader :evaluations, :exposures

      def initialize(evaluations:, exposures: nil)
        raise ArgumentError, "evaluations must be an Exporter::FlagEvaluations" unless evaluations.is_a?(FlagEvaluations)
        if exposures && !exposures.is_a?(Exposures)
          raise ArgumentError, "exposures must be an Exporter::Exposures or nil"
        end

        @evaluations = evaluations
        @exposures = exposures
        @delegating = nil # the last class found to delegate its readers to `resolution_details`
        @delegates = {}   # Class => whether it does (at most CLASSES_KEPT)
      end

      # The keywords of the SDK's own `OpenFeature::SDK::Hooks::Hook#finally`,
      # which every release with hooks (0.5.1 through 0.6.5) passes, no more:
      # `hints:` is ignored (optional here). Not `**`: that is a Hash per
      # call, ~730 instructions, an eighth of the call.
      def finally(hook_context:, evaluation_details:, hints: nil)
        d = evaluation_details
        r = d.class.equal?(@delegating) ? d.resolution_details : resolved(d)
        fields = hook_context.evaluation_context&.fields
        exposure = @evaluations._record_hook(r.flag_metadata, fields, d.flag_key, r.variant, r.error_code,
                                             r.error_message, @exposures)
        expose(*exposure) if exposure
        nil
      rescue StandardError => e
        @evaluations._hook_failed("#{e.class}: #{e.message}")
        nil
      end

      private

      # The readers of the SDK's EvaluationDetails are Forwardable
      # delegators to its `resolution_details`, ~150 ns each; the hook reads
      # `resolution_details` once and its members from it, which gives the
      # same values for a sixth of the cost. A class is read so when it is
      # a Struct of `flag_key` and `resolution_details` whose readers are
      # Forwardable's (checked once per class); any other object is read
      # through its own readers.
      def resolved(details)
        klass = details.class
        known = @delegates.fetch(klass) do
          @delegates.clear if @delegates.size >= CLASSES_KEPT # classes made per call must not pile up
          @delegates[klass] = delegates?(klass)
        end
        return details unless known

        @delegating = klass
        details.resolution_details
      end

      DELEGATED = %i[variant error_code error_message flag_metadata].freeze
      CLASSES_KEPT = 16
      private_constant :DELEGATED, :CLASSES_KEPT

      def delegates?(klass)
        return false unless klass < Struct && klass.members == %i[flag_key resolution_details] && defined?(::Forwardable)

        forwardable = ::Forwardable.instance_method(:def_instance_delegator).source_location&.first
        DELEGATED.all? { |name| klass.instance_method(name).source_location&.first == forwardable }
      rescue NameError
        false
      end

      def expose(flag, allocation, variant, targeting_key, fields)
        attributes = fields.reject { |k, _| k == TARGETING_KEY }
        @exposures.record(flag: flag, allocation: allocation, variant: variant, subject_id: targeting_key,
                          subject_attributes: attributes)
      end
    end
  end
end
