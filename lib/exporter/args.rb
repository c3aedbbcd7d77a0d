# frozen_string_literal: true

module Exporter
  # Argument checks shared by the constructors: each returns the value (or
  # its normalised form) or raises ArgumentError naming the argument,
  # whatever the value given (huge or non-finite numbers, big Integers,
  # other types).
  module Args
    # Longest duration any option accepts (a day): more is a mistake, and
    # the native side turns seconds into durations that must not overflow.
    MAX_SECONDS = 86_400.0
    # Largest count or size any option accepts.
    MAX_COUNT = 1 << 31

    module_function

    def string(name, value)
      return value if value.is_a?(String)

      raise ArgumentError, "#{name} must be a String (got #{value.class})"
    end

    # An Integer in `range` (1..MAX_COUNT by default).
    def integer(name, value, range = 1..MAX_COUNT)
      raise ArgumentError, "#{name} must be an Integer (got #{value.class})" unless value.is_a?(Integer)
      return value if range.cover?(value)

      raise ArgumentError, "#{name} must be between #{range.min} and #{range.max} (got #{value})"
    end

    # A positive number of seconds, at most MAX_SECONDS, as a Float.
    def seconds(name, value)
      f = Float(value, exception: false) if value.is_a?(Numeric) || value.is_a?(String)
      return f if f&.finite? && f.positive? && f <= MAX_SECONDS

      raise ArgumentError,
            "#{name} must be a positive number of seconds, at most #{MAX_SECONDS.to_i} (got #{value.inspect})"
    end
  end
end
