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
    # may be nil). It only captures, on the caller's thread; it never raises
    # into the application: a failure is counted in
    # `evaluations.stats[:hook_failures]` and logged once.
    class Hook
      ALLOCATION_KEY = "__dd_allocation_key"
      ALLOCATION_KEY_ALT = "allocationKey"
      TIMESTAMP_KEY = "__dd_eval_timestamp_ms"
      TIMESTAMP_KEY_ALT = "dd.eval.timestamp_ms"
      CONSENT_KEY = "observe_full_evaluation_data"
      TARGETING_KEY = "targeting_key"

      attr_reader :evaluations, :exposures

      def initialize(evaluations:, exposures: nil)
        raise ArgumentError, "evaluations must be an Exporter::FlagEvaluations" unless evaluations.is_a?(FlagEvaluations)
        if exposures && !exposures.is_a?(Exposures)
          raise ArgumentError, "exposures must be an Exporter::Exposures or nil"
        end

        @evaluations = evaluations
        @exposures = exposures
      end

      def finally(hook_context:, evaluation_details:, **)
        meta = evaluation_details.flag_metadata
        allocation = nil
        timestamp = nil
        full = false
        if meta && !meta.empty?
          allocation = meta[ALLOCATION_KEY] || meta[ALLOCATION_KEY_ALT]
          timestamp = meta[TIMESTAMP_KEY] || meta[TIMESTAMP_KEY_ALT]
          timestamp = nil unless timestamp.is_a?(Integer)
          full = meta[CONSENT_KEY] == true
        end
        fields = hook_context.evaluation_context&.fields
        targeting_key = fields && fields[TARGETING_KEY]
        variant = evaluation_details.variant
        flag = evaluation_details.flag_key
        # The context is only read with consent: do not hand it over otherwise.
        @evaluations._record(flag, variant, allocation, targeting_key, full ? fields : nil,
                             evaluation_details.error_code, evaluation_details.error_message, timestamp, full, true)
        expose(flag, allocation, variant, targeting_key, fields) if @exposures && allocation && variant && targeting_key
        nil
      rescue StandardError => e
        @evaluations._hook_failed("#{e.class}: #{e.message}")
        nil
      end

      private

      def expose(flag, allocation, variant, targeting_key, fields)
        attributes = fields.reject { |k, _| k == TARGETING_KEY }
        @exposures.record(flag: flag, allocation: allocation, variant: variant, subject_id: targeting_key,
                          subject_attributes: attributes)
      end
    end
  end
end
