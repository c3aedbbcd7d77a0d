# frozen_string_literal: true

module Exporter
  # Base class of the gem's own errors.
  class Error < StandardError; end

  # A trace or span that cannot be sent as given. The message names the
  # trace index, span index and field. Raised before anything is sent.
  class InvalidTraceError < ArgumentError; end
end
