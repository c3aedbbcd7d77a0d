# frozen_string_literal: true

module Exporter
  VERSION = "0.1.0"
end
