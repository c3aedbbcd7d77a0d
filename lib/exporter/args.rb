# frozen_string_literal: true

module Exporter
  # Argument checks shared by the constructors: each returns the value (or
  # its normalised form) or raises ArgumentError naming the argument.
  module Args
    module_function

    def string(name, value)
      return value if value.is_a?(String)

      raise ArgumentError, "#{name} must be a String (got #{value.class})"
    end

    def integer(name, value)
      return value if value.is_a?(Integer)

      raise ArgumentError, "#{name} must be an Integer (got #{value.class})"
    end

    def seconds(name, value)
      f = Float(value, exception: false) if value.is_a?(Numeric) || value.is_a?(String)
      return f if f&.finite? && f.positive?

      raise ArgumentError, "#{name} must be a positive number of seconds (got #{value.inspect})"
    end
  end
end
