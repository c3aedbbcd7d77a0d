# frozen_string_literal: true

require "etc"
require "json"
require "set"
require "tmpdir"

# Subprocess mode with real processes: lone Ruby processes (no fork) with
# EXPORTER_SIDECAR=subprocess hand their traces, exposures and evaluation
# counts to the per-user helper (exporter-sidecar), which sends them. Each
# example has an XDG_RUNTIME_DIR of its own; the rspec process is the
# subreaper of the helpers (see HelperProcesses), reaps them with a bound
# and kills what is left in an `after`.
RSpec.describe "Exporter::Sidecar subprocess mode" do # rubocop:disable RSpec/DescribeClass
  AGENT_SOCKETS = File.expand_path("support/agent_sockets.rb", __dir__)
  PRELUDE = <<~RUBY
    require "exporter"; require "json"; require "set"; require "uri"
    require #{AGENT_SOCKETS.inspect}
    def report(h) = ($stdout.puts(JSON.generate(h)); $stdout.flush)
    def trace(id) = [{ trace_id: id, span_id: id, name: "job", resource: "r", start: 1, duration: 1,
                       meta: { "pid" => Process.pid.to_s } }]
  RUBY

  let!(:agent) { TestAgent.shared.clear }
  let(:agent_port) { URI(agent.url).port }
  let(:xdg) { Dir.mktmpdir("exporter-xdg") }
  let(:dir) { File.join(xdg, "exporter") }
  let(:socket) { File.join(dir, "sidecar-#{Exporter::VERSION}.sock") }
  let(:log) { "#{socket}.log" }
  let(:idle) { 60 }
  let(:env) do
    { "EXPORTER_SIDECAR" => "subprocess", "XDG_RUNTIME_DIR" => xdg, "EXPORTER_SIDECAR_IDLE_SECONDS" => idle.to_s,
      "AGENT_URL" => agent.url }
  end

  before(:all) { HelperProcesses.subreaper(true) }
  after(:all) { HelperProcesses.subreaper(false) }

  before do
    skip "exporter-sidecar not built (rake compile)" unless File.executable?(HelperProcesses::HELPER)
  end

  after do
    HelperProcesses.kill_helpers(xdg)
    FileUtils.rm_rf(xdg)
  end

  # Runs a lone Ruby process (no fork) in subprocess mode; returns its
  # reports (JSON lines). Fails unless it exits 0 within `timeout`.
  def run_client(body, timeout: 30, extra_env: {})
    out = File.join(xdg, "client-#{rand(1 << 30)}.out")
    pid = Process.spawn(env.merge(extra_env), ruby_bin, "-I#{lib_dir}", "-e", PRELUDE + body,
                        out: out, err: "#{out}.err")
    status = wait_bounded(pid, timeout: timeout)
    expect(status).to be_success, "client failed: #{File.read("#{out}.err")}"
    File.readlines(out).map { |l| JSON.parse(l, symbolize_names: true) }
  end

  # Starts `n` clients at once; their reports.
  def run_clients(n, body, timeout: 60)
    threads = Array.new(n) do
      Thread.new { run_client(body, timeout: timeout) }.tap { |t| t.report_on_exception = false }
    end
    threads.each { |t| t.join rescue nil } # rubocop:disable Style/RescueModifier
    threads.map(&:value)
  end

  def helper_status = Exporter::Sidecar.helper_status(socket: socket, timeout: 5)

  def trace_ids = agent.traces.map { |t| t.first["trace_id"] }

  it "a lone process hands traces, exposures and evaluation counts to the helper; it holds no agent connection",
     timeout: 90 do
    evp = EvpRecorder.new
    reports = run_client(<<~RUBY, extra_env: { "EVP_URL" => evp.url })
      t = Exporter::Transport.new(url: ENV["AGENT_URL"], service: "helper-spec")
      w = Exporter::Writer.new(transport: t, flush_interval: 60)
      x = Exporter::Exposures.new(url: ENV["AGENT_URL"], flush_interval: 60, service: "helper-spec")
      e = Exporter::FlagEvaluations.new(url: ENV["EVP_URL"], flush_interval: 60, service: "helper-spec")
      (1..10).each { |i| w.write(trace(i)) }
      x.record(flag: "checkout", allocation: "a1", variant: "on", subject_id: "user-1")
      3.times { e.record(flag: "checkout", variant: "on", allocation: "a1") }
      flushed = [w.flush(timeout: 15), x.flush(timeout: 15), e.flush(timeout: 15)]
      ports = [URI(ENV["AGENT_URL"]).port, URI(ENV["EVP_URL"]).port]
      report(flushed: flushed, status: Exporter::Sidecar.status, helper: Exporter::Sidecar.helper_status,
             connections: ports.sum { |p| AgentSockets.connections(Process.pid, p) })
    RUBY
    r = reports.last
    expect(r[:flushed]).to eq([true, true, true])
    expect(r[:status]).to include(mode: "subprocess", role: "client", socket: socket)
    expect(r[:status][:counters]).to include(traces_handed_over: 10, exposures_handed_over: 1, evaluations_handed_over: 3,
                                                   traces_direct: 0, helper_starts: 1, helper_connects: 1)
    expect(r[:connections]).to eq(0)
    helper = r[:helper][:pid]
    expect(HelperProcesses.helper_pids(xdg)).to eq([helper])

    expect(eventually(timeout: 15) { (ids = trace_ids).size >= 10 && ids }.sort).to eq((1..10).to_a)
    expect(eventually(timeout: 15) { (x = agent.exposures).any? && x }.map { |e| e["subject"]["id"] }).to eq(["user-1"])
    # No client is left: the helper sends the evaluation aggregate at once.
    eventually(timeout: 15) { evp.bodies.any? }
    expect(evp.rows).to contain_exactly(include("evaluation_count" => 3, "flag" => { "key" => "checkout" }))
    expect(AgentSockets.connections(helper, agent_port)).to be_positive

    st = File.lstat(dir)
    expect([st.directory?, st.mode & 0o7777, st.uid]).to eq([true, 0o700, Process.euid])
    expect(File.lstat(socket)).to be_socket
    expect(File.read("/proc/#{helper}/status")[/^Uid:\s+(\d+)/, 1].to_i).to eq(Process.euid)
    expect(helper_status).to include(traces_received: 10, exposures_received: 1, evaluations_received: 3,
                                     peers_refused: 0)
  ensure
    evp&.close
  end

  context "as root, against another uid", if: Process.euid.zero? do
    let(:nobody) { Etc.getpwnam("nobody").uid }

    # Runs Ruby as `nobody`; its output.
    def as_nobody(script)
      out = File.join(xdg, "nobody.out")
      File.write(out, "")
      File.chmod(0o666, out)
      pid = Process.spawn("/usr/sbin/runuser", "-u", "nobody", "--", ruby_bin, "-rsocket", "-e", script,
                          out: out, err: out, unsetenv_others: true, chdir: "/")
      wait_bounded(pid, timeout: 20)
      File.read(out)
    end

    def start_helper
      run_client("Exporter::Writer.new(transport: Exporter::Transport.new(url: ENV['AGENT_URL'])).tap { |w| w.write(trace(1)); exit!(w.flush(timeout: 10) ? 0 : 1) }")
      helper_status.fetch(:pid)
    end

    it "a process of another uid cannot connect: the directory is 0700 and ours" do
      start_helper
      File.chmod(0o755, xdg) # the outer directory opened: ours still stops it
      out = as_nobody("begin; UNIXSocket.new(#{socket.inspect}); puts 'connected'; rescue SystemCallError => e; puts e.class; end")
      expect(out.strip).to eq("Errno::EACCES")
      expect(helper_status).to include(peers_refused: 0)
    end

    it "with the directory opened on purpose, the helper refuses the other uid on accept (SO_PEERCRED), counted" do
      start_helper
      File.chmod(0o755, xdg)
      File.chmod(0o755, dir)
      File.chmod(0o777, socket)
      hello = ["EXSC", 1, 4242, Exporter::VERSION.bytesize, Exporter::VERSION].pack("a4 S< L< S< a*").inspect
      out = as_nobody(<<~RUBY)
        s = UNIXSocket.new(#{socket.inspect})
        s.write(#{hello}) rescue nil
        s.wait_readable(10)
        got = (s.read_nonblock(64) rescue $!.class.name)
        puts got.inspect
      RUBY
      # Closed on accept: nothing read, no welcome.
      expect(out.strip).to match(/\A(""|nil|"EOFError"|"Errno::ECONNRESET")\z/)
      File.chmod(0o700, dir) # our own clients (and this query) verify it again
      expect(helper_status).to include(peers_refused: 1)
      expect(File.read(log)).to include("runs as uid #{nobody}, not ours: refused")
    end
  end

  it "two lone processes share one helper, with one agent connection for both" do
    reports = run_clients(2, <<~RUBY)
      w = Exporter::Writer.new(transport: Exporter::Transport.new(url: ENV["AGENT_URL"]), flush_interval: 60)
      (1..5).each { |i| w.write(trace(Process.pid * 100 + i)) }
      report(flushed: w.flush(timeout: 15), helper: Exporter::Sidecar.helper_status,
             connections: AgentSockets.connections(Process.pid, URI(ENV["AGENT_URL"]).port))
    RUBY
    r = reports.map(&:last)
    expect(r.map { |x| x[:flushed] }).to eq([true, true])
    expect(r.map { |x| x[:connections] }).to eq([0, 0])
    pids = r.map { |x| x[:helper][:pid] }.uniq
    expect(pids.size).to eq(1)
    expect(HelperProcesses.helper_pids(xdg)).to eq(pids)
    eventually(timeout: 15) { trace_ids.size >= 10 }
    expect(AgentSockets.connections(pids.first, agent_port)).to eq(1)
    expect(helper_status).to include(traces_received: 10, traces_sent: 10)
  end

  it "20 processes started at once start exactly one helper", timeout: 120 do
    reports = run_clients(20, <<~RUBY, timeout: 90)
      w = Exporter::Writer.new(transport: Exporter::Transport.new(url: ENV["AGENT_URL"]), flush_interval: 60)
      w.write(trace(Process.pid))
      report(flushed: w.flush(timeout: 30), counters: Exporter::Sidecar.status[:counters],
             helper: Exporter::Sidecar.helper_status(timeout: 10))
    RUBY
    r = reports.map(&:last)
    expect(r.map { |x| x[:flushed] }.uniq).to eq([true])
    expect(r.map { |x| x[:helper][:pid] }.uniq.size).to eq(1)
    expect(r.sum { |x| x[:counters][:helper_starts] }).to eq(1)
    expect(r.sum { |x| x[:counters][:traces_handed_over] }).to eq(20)
    expect(HelperProcesses.helper_pids(xdg).size).to eq(1)
    expect(File.read(log).scan("serving").size).to eq(1)
    expect(eventually(timeout: 15) { (ids = trace_ids).size >= 20 && ids }.size).to eq(20)
  end

  it "a helper SIGKILLed mid-stream: its clients send direct, then start a new helper; nothing written after " \
     "the kill is lost; the loss is what the helper held", timeout: 120 do
    script = PRELUDE + <<~RUBY
      live = Exporter::Writer.new(transport: Exporter::Transport.new(url: ENV["AGENT_URL"]), flush_interval: 0.05)
      # Nothing listens on port 9: what goes there stays held by the helper.
      dead = Exporter::Writer.new(transport: Exporter::Transport.new(url: "http://127.0.0.1:9"), flush_interval: 60)
      (1..20).each { |i| live.write(trace(i)) }
      (500...510).each { |i| dead.write(trace(i)) }
      report(flushed: [live.flush(timeout: 15), dead.flush(timeout: 15)], helper: Exporter::Sidecar.helper_status)
      $stdin.gets # the spec kills the helper
      killed_at = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      first_handover = nil
      (1000...1100).each do |i|
        live.write(trace(i))
        before = Exporter::Sidecar.status[:counters][:helper_connects]
        sleep 0.01
        now = Exporter::Sidecar.status[:counters][:helper_connects]
        first_handover ||= Process.clock_gettime(Process::CLOCK_MONOTONIC) - killed_at if now > before
      end
      flushed = live.flush(timeout: 15)
      report(flushed: flushed, counters: Exporter::Sidecar.status[:counters], helper: Exporter::Sidecar.helper_status,
             reconnected_after: first_handover)
    RUBY
    out_r, out_w = IO.pipe
    in_r, in_w = IO.pipe
    pid = Process.spawn(env, ruby_bin, "-I#{lib_dir}", "-e", script, in: in_r, out: out_w,
                                                                      err: File.join(xdg, "kill.err"))
    [in_r, out_w].each(&:close)
    begin
      first = JSON.parse(Timeout.timeout(30) { out_r.gets }, symbolize_names: true)
      expect(first[:flushed]).to eq([true, true])
      old = first[:helper][:pid]
      eventually(timeout: 15) { (trace_ids & (1..20).to_a).size == 20 }
      held = helper_status
      expect(held).to include(traces_received: 30, traces_sent: 20)
      Process.kill(:KILL, old)
      expect(HelperProcesses.reap(old, timeout: 10).termsig).to eq(Signal.list["KILL"])
      in_w.puts("go")
      in_w.close
      last = JSON.parse(Timeout.timeout(60) { out_r.gets }, symbolize_names: true)
      expect(wait_bounded(pid, timeout: 30)).to be_success
      pid = nil
      expect(last[:flushed]).to be(true)
      c = last[:counters]
      expect(c[:helper_connections_lost]).to be >= 1
      expect(c[:traces_direct]).to be >= 1
      expect(c[:helper_starts]).to eq(2)
      expect(c[:traces_handed_over] + c[:traces_direct]).to be >= 130
      expect(last[:helper][:pid]).not_to eq(old)
      expect(last[:reconnected_after]).to be < 3.0
      warn "helper SIGKILL: #{c.slice(:traces_direct, :traces_handed_over, :helper_starts, :helper_connections_lost)}, reconnected after #{last[:reconnected_after].round(3)} s" if ENV["EXPORTER_SPEC_FIGURES"]
      after_kill = (1000...1100).to_a
      ids = eventually(timeout: 15) { (i = trace_ids) && (after_kill - i).empty? && i }
      expect(after_kill - ids).to eq([])
      expect((1..20).to_a - ids).to eq([])
      # What the killed helper held (10 traces for an unreachable agent) is the loss.
      lost = held[:traces_received] - held[:traces_sent] - held[:traces_failed]
      expect(lost).to eq(10)
    ensure
      kill_hard(pid) if pid
      out_r.close
    end
  end

  context "auto" do
    let(:auto_env) { { "EXPORTER_SIDECAR" => "auto" } }
    let(:write_and_report) do
      <<~RUBY
        w = Exporter::Writer.new(transport: Exporter::Transport.new(url: ENV["AGENT_URL"]), flush_interval: 60)
        w.write(trace(Process.pid))
        flushed = w.flush(timeout: 15)
        before_fork = Exporter::Sidecar.status
        r, wr = IO.pipe
        child = fork do
          w.write(trace(Process.pid))
          wr.write(JSON.generate(flushed: w.flush(timeout: 15), status: Exporter::Sidecar.status))
          exit!(0)
        end
        wr.close
        child_report = JSON.parse(r.read, symbolize_names: true)
        Process.wait(child)
        report(flushed: flushed, before_fork: before_fork, after_fork: Exporter::Sidecar.status,
               child: child_report)
      RUBY
    end

    it "with no helper running, a lone process is direct and starts none; forking makes it a listener as before" do
      r = run_client(write_and_report, extra_env: auto_env).last
      expect(r[:flushed]).to be(true)
      expect(r[:before_fork]).to include(mode: "direct", role: "none", socket: nil)
      expect(r[:after_fork]).to include(mode: "thread", role: "listener")
      expect(r[:child][:status]).to include(mode: "thread", role: "client")
      expect(HelperProcesses.helper_pids(xdg)).to eq([])
    end

    it "with a helper running (or EXPORTER_SIDECAR_SOCKET set), a process uses it until it forks, then is a " \
       "listener as before" do
      run_client(<<~RUBY) # subprocess mode: starts the helper
        w = Exporter::Writer.new(transport: Exporter::Transport.new(url: ENV["AGENT_URL"]))
        w.write(trace(1)); exit!(w.flush(timeout: 10) ? 0 : 1)
      RUBY
      helper = helper_status[:pid]
      r = run_client(write_and_report, extra_env: auto_env).last
      expect(r[:flushed]).to be(true)
      expect(r[:before_fork]).to include(mode: "subprocess", role: "client", socket: socket)
      expect(r[:before_fork][:counters]).to include(traces_handed_over: 1, helper_starts: 0)
      expect(r[:after_fork]).to include(mode: "thread", role: "listener", socket: nil)
      expect(r[:child]).to include(flushed: true)
      expect(r[:child][:status]).to include(mode: "thread", role: "client")
      expect(helper_status).to include(pid: helper, traces_received: 2)

      # An explicit socket: used (and started if needed) in auto too.
      other = File.join(xdg, "mine", "s.sock")
      Dir.mkdir(File.dirname(other), 0o700)
      r = run_client(write_and_report,
                     extra_env: auto_env.merge("EXPORTER_SIDECAR_SOCKET" => other)).last
      expect(r[:before_fork]).to include(mode: "subprocess", socket: other)
      expect(r[:before_fork][:counters]).to include(traces_handed_over: 1, helper_starts: 1)
      expect(Exporter::Sidecar.helper_status(socket: other)).to include(traces_received: 1)
      expect(HelperProcesses.helper_pids(xdg).size).to eq(2)
    end
  end

  context "idle" do
    let(:idle) { 1 }

    it "exits after the idle period with no client, reaped (no zombie), holding no descriptor of the host" do
      marker = File.join(xdg, "marker")
      reports = run_client(<<~RUBY)
        leaked = File.open(#{marker.inspect}, "w")
        leaked.close_on_exec = false
        w = Exporter::Writer.new(transport: Exporter::Transport.new(url: ENV["AGENT_URL"]), flush_interval: 60)
        w.write(trace(7))
        flushed = w.flush(timeout: 15)
        helper = Exporter::Sidecar.helper_status[:pid]
        fds = Dir.children("/proc/\#{helper}/fd").map { |fd| File.readlink("/proc/\#{helper}/fd/\#{fd}") rescue "?" }
        zombies = Dir.children("/proc").grep(/\\A\\d+\\z/).select do |p|
          s = File.read("/proc/\#{p}/stat") rescue next
          f = s[(s.rindex(")") + 2)..].split
          f[0] == "Z" && f[1].to_i == Process.pid
        end
        report(flushed: flushed, helper: helper, fds: fds, zombies: zombies,
               session: File.read("/proc/\#{helper}/stat").then { |s| s[(s.rindex(")") + 2)..].split[3].to_i })
      RUBY
      client_exited = monotonic
      r = reports.last
      expect(r[:flushed]).to be(true)
      expect(r[:zombies]).to eq([]) # the launcher was reaped by the host
      expect(r[:session]).to eq(r[:helper]) # its own session
      expect(r[:fds]).not_to include(marker)
      expect(r[:fds]).to all(satisfy do |t|
        t == "/dev/null" || t.start_with?("socket:[", "anon_inode:") || t == log || t == "#{socket}.lock"
      end)
      status = HelperProcesses.reap(r[:helper], timeout: 15)
      expect(status).to be_success
      expect(monotonic - client_exited).to be >= 0.9
      expect(File.exist?(socket)).to be(false)
      expect(File.read(log)).to include("exiting: no client and nothing held for 1 s; everything sent")
      expect(trace_ids).to eq([7])
    end
  end
end
