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
      expect(Dir.glob("#{dir}/home/**/target")).to be_empty
      sos = Dir.glob("#{dir}/home/**/exporter.so")
      expect(sos).not_to be_empty
      # The sidecar helper binary beside every copy of the extension.
      sos.each { |so| expect(File.executable?(File.join(File.dirname(so), "exporter-sidecar"))).to be(true), so }
      agent = TestAgent.shared.clear
      xdg = File.join(dir, "xdg")
      Dir.mkdir(xdg, 0o700)
      script = <<~RUBY
        require "exporter"
        abort "loaded from the checkout" if $LOADED_FEATURES.grep(%r{#{ROOT}/lib}).any?
        abort "helper not found: \#{Exporter::Sidecar.helper_path.inspect}" unless Exporter::Sidecar.helper_path&.start_with?(#{dir.inspect})
        r = Exporter::Transport.new(url: #{agent.url.inspect}).send_traces([[{ trace_id: 42, span_id: 1, name: "gem" }]])
        w = Exporter::Writer.new(transport: Exporter::Transport.new(url: #{agent.url.inspect}))
        w.write([{ trace_id: 43, span_id: 1, name: "gem" }])
        c = Exporter::Sidecar.status[:counters] if w.flush(timeout: 10)
        exit(r.ok? && c && c[:traces_handed_over] == 1 && c[:helper_starts] == 1 ? 0 : 1)
      RUBY
      load_env = { "GEM_HOME" => File.join(dir, "home"), "GEM_PATH" => File.join(dir, "home"), "RUBYOPT" => nil,
                   "BUNDLE_GEMFILE" => nil, "RUBYLIB" => nil, "EXPORTER_SIDECAR" => "subprocess",
                   "XDG_RUNTIME_DIR" => xdg, "EXPORTER_SIDECAR_IDLE_SECONDS" => "1" }
      begin
        HelperProcesses.subreaper(true)
        pid = Process.spawn(load_env, ruby_bin, "-e", script, chdir: dir, unsetenv_others: false)
        expect(wait_bounded(pid, timeout: 30)).to be_success
        expect(eventually { (t = agent.traces).size >= 2 && t }.map { |t| t.first["trace_id"] }.sort).to eq([42, 43])
      ensure
        HelperProcesses.kill_helpers(xdg)
        HelperProcesses.subreaper(false)
      end
    end
  end
end
