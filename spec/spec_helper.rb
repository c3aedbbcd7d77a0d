# frozen_string_literal: true

$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
require "exporter"
require "timeout"

Dir[File.join(__dir__, "support", "*.rb")].sort.each { |f| require f }

RSpec.configure do |config|
  config.disable_monkey_patching!
  config.order = :defined
  config.include ProcessHelpers
  config.include SidecarHelpers

  # No spec may hang the suite.
  config.around do |example|
    Timeout.timeout(example.metadata.fetch(:timeout, 60)) { example.run }
  end

  config.after(:suite) { TestAgent.stop_shared }
end
