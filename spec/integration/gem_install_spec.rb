# frozen_string_literal: true

require "tmpdir"

# `gem build` + `gem install --local` compiles the extension with cargo (no
# rb_sys gem) and the installed gem loads and sends; no target/ inside it.
RSpec.describe "gem build and install" do # rubocop:disable RSpec/DescribeClass
  ROOT = File.expand_path("../..", __dir__)

  # Runs a command with a bounded wait, its output in `log`; returns
  # [status, output].
  def run_bounded(env, argv, chdir:, log:, timeout:)
    pid = Process.spawn(env, *argv, chdir: chdir, out: log, err: log, pgroup: true)
    [wait_bounded(pid, timeout: timeout), File.read(log)]
  end

  it "installs from the built gem and works", timeout: 600 do
    Dir.mktmpdir("exporter-gem") do |dir|
      gem = File.join(dir, "exporter.gem")
      status, out = run_bounded({}, %W[gem build exporter.gemspec -o #{gem}],
                                chdir: ROOT, log: "#{dir}/build.log", timeout: 120)
      expect(status).to be_success, out
      # Reuse the workspace's cargo build so the spec does not compile twice.
      env = { "EXPORTER_CARGO_TARGET_DIR" => File.join(ROOT, "target"), "GEM_HOME" => File.join(dir, "home") }
      status, out = run_bounded(env, %W[gem install --local --no-document #{gem}],
                                chdir: dir, log: "#{dir}/install.log", timeout: 480)
      expect(status).to be_success, out
      installed = File.join(dir, "home", "gems", "exporter-#{Exporter::VERSION}")
      expect(Dir.glob("#{installed}/**/target")).to be_empty
      expect(Dir.glob("#{dir}/home/**/exporter.so")).not_to be_empty
      agent = TestAgent.shared.clear
      script = <<~RUBY
        require "exporter"
        abort "loaded from the checkout" if $LOADED_FEATURES.grep(%r{#{ROOT}/lib}).any?
        r = Exporter::Transport.new(url: #{agent.url.inspect}).send_traces([[{ trace_id: 42, span_id: 1, name: "gem" }]])
        exit(r.ok? ? 0 : 1)
      RUBY
      load_env = { "GEM_HOME" => File.join(dir, "home"), "GEM_PATH" => File.join(dir, "home"), "RUBYOPT" => nil,
                   "BUNDLE_GEMFILE" => nil, "RUBYLIB" => nil }
      pid = Process.spawn(load_env, ruby_bin, "-e", script, chdir: dir, unsetenv_others: false)
      expect(wait_bounded(pid, timeout: 30)).to be_success
      expect(agent.traces.map { |t| t.first["trace_id"] }).to eq([42])
    end
  end
end
