# frozen_string_literal: true

require "stringio"

# Faults an application meets in production: an agent that restarts, fails
# or is slow, forks in the middle of a send, objects dropped without
# `stop`, bad configuration. Nothing may be lost that fitted in the buffer,
# nothing may hang, and the counters always add up.
RSpec.describe "reliability" do # rubocop:disable RSpec/DescribeClass
  after { @servers&.each(&:close) }

  def server(port: 0, &script)
    (@servers ||= []) << ScriptedServer.new(port: port, &script)
    @servers.last
  end

  def ok = [200, {}, "{}"]

  def adds_up?(stats)
    stats[:written] == stats[:sent] + stats[:failed] + stats[:dropped] + stats[:queued]
  end

  describe "configuration" do
    it "rejects a URL with whitespace or control characters, naming url" do
      ["http://127.0.0.1:8126\n", " http://127.0.0.1:8126", "http://127.0.0.1:81\t26", "http://a b:1"].each do |url|
        expect { Exporter::Transport.new(url: url) }.to raise_error(ArgumentError, /agent url/)
        expect { Exporter::Exposures.new(url: url) }.to raise_error(ArgumentError, /agent url/)
      end
    end

    it "rejects credentials in the URL and never prints them" do
      url = "http://user:s3cr3t@127.0.0.1:8126"
      expect { Exporter::Transport.new(url: url) }.to raise_error(ArgumentError) { |e|
        expect(e.message).to include("credentials")
        expect(e.message).not_to include("s3cr3t")
      }
      expect { Exporter::Exposures.new(url: url) }.to raise_error(ArgumentError) { |e|
        expect(e.message).not_to include("s3cr3t")
      }
    end

    it "range-checks every option with an ArgumentError naming it" do
      t = Exporter::Transport.new(url: "http://127.0.0.1:1")
      [1e300, Float::NAN, Float::INFINITY, -1, 0, 2**70, "x", nil].each do |v|
        %i[timeout deadline].each do |k|
          next if v.nil? # nil means "the default"

          expect { Exporter::Transport.new(url: "http://127.0.0.1:1", k => v) }.to raise_error(ArgumentError, /#{k}/)
        end
        expect { Exporter::Writer.new(transport: t, flush_interval: v) }.to raise_error(ArgumentError, /flush_interval/)
        expect { Exporter::Exposures.new(url: "http://127.0.0.1:1", flush_interval: v) }
          .to raise_error(ArgumentError, /flush_interval/)
      end
      [2**64, -1, 0, 1.5, nil].each do |v|
        expect { Exporter::Writer.new(transport: t, buffer_size: v) }.to raise_error(ArgumentError, /buffer_size/)
        expect { Exporter::Transport.new(url: "http://127.0.0.1:1", max_payload_size: v) }
          .to raise_error(ArgumentError, /max_payload_size/)
      end
      [2**64, -1, 101].each do |v|
        expect { Exporter::Transport.new(url: "http://127.0.0.1:1", max_retries: v) }
          .to raise_error(ArgumentError, /max_retries/)
      end
      t.close
    end

    it "takes any flush timeout: huge waits are capped, NaN and negatives raise" do
      t = Exporter::Transport.new(url: "http://127.0.0.1:1")
      w = Exporter::Writer.new(transport: t)
      expect(w.flush(timeout: 1e300)).to be(true) # nothing queued: at once
      expect(w.flush(timeout: Float::INFINITY)).to be(true)
      expect { w.flush(timeout: Float::NAN) }.to raise_error(ArgumentError, /timeout/)
      expect { w.flush(timeout: -1) }.to raise_error(ArgumentError, /timeout/)
      expect { w.flush(timeout: nil) }.to raise_error(ArgumentError, /timeout/)
      w.stop
    end
  end

  describe "agent outages" do
    it "loses nothing written while the agent is down, and sends it once when it is back" do
      first = server { ok }
      port = first.port
      t = Exporter::Transport.new(url: first.url, timeout: 0.5)
      w = Exporter::Writer.new(transport: t, flush_interval: 0.05)
      w.write(SpanFactory.trace(1))
      expect(w.flush(timeout: 5)).to be(true)
      first.close # the agent goes away (a restart during a deploy)
      (2..201).each { |i| expect(w.write(SpanFactory.trace(i))).to be(true) }
      expect(w.flush(timeout: 1.5)).to be(false)
      expect(w.stats).to include(failed: 0, dropped: 0)
      expect(w.stats[:retries]).to be >= 1
      back = server(port: port) { ok } # same port
      expect(w.flush(timeout: 15)).to be(true)
      expect(first.trace_ids + back.trace_ids).to eq((1..201).to_a)
      expect(w.stats).to include(written: 201, sent: 201, failed: 0, dropped: 0, queued: 0)
      w.stop
    end

    it "keeps traces through a run of 500s and sends each once" do
      s = server { |n| n < 6 ? [500, {}, "busy"] : ok }
      w = Exporter::Writer.new(transport: Exporter::Transport.new(url: s.url, timeout: 0.5), flush_interval: 0.05)
      (1..50).each { |i| w.write(SpanFactory.trace(i)) }
      expect(w.flush(timeout: 15)).to be(true)
      expect(s.trace_ids(s.received.drop(6)).sort).to eq((1..50).to_a) # those answered 200
      expect(w.stats).to include(sent: 50, failed: 0, dropped: 0)
      w.stop
    end

    it "when kept traces need the room, drops the oldest and counts them" do
      w = Exporter::Writer.new(transport: Exporter::Transport.new(url: "http://127.0.0.1:#{TestAgent.free_port}",
                                                                  timeout: 0.1),
                               buffer_size: 10, flush_interval: 0.02)
      60.times { |i| w.write(SpanFactory.trace(i + 1)) }
      stats = eventually { (s = w.stats)[:dropped].positive? && s }
      expect(adds_up?(stats)).to be(true)
      expect(stats[:queued]).to be <= 10 + 1000 # buffer + one batch in flight
      w.stop(timeout: 0.1)
    end

    it "a slow agent converges: timeouts grow, every trace arrives, possible duplicates are counted" do
      # Answers after 0.6 s; the configured attempt timeout is 0.25 s.
      s = server { [:sleep, 0.6, [200, {}, "{}"]] }
      w = Exporter::Writer.new(transport: Exporter::Transport.new(url: s.url, timeout: 0.25), flush_interval: 0.05)
      (1..20).each { |i| w.write(SpanFactory.trace(i)) }
      expect(w.flush(timeout: 20)).to be(true)
      stats = w.stats
      expect(stats).to include(sent: 20, failed: 0, dropped: 0)
      expect(stats[:timed_out]).to be >= 20 # sent again after a timeout: may be duplicates
      expect(s.trace_ids.uniq.sort).to eq((1..20).to_a)
      w.stop
    end

    it "exposures are kept through an outage too" do
      port = TestAgent.free_port
      e = Exporter::Exposures.new(url: "http://127.0.0.1:#{port}", timeout: 0.3, flush_interval: 0.05)
      (1..30).each { |i| e.record(flag: "f", allocation: "a", variant: "v", subject_id: "u#{i}") }
      expect(e.flush(timeout: 1)).to be(false)
      back = server(port: port) { ok }
      expect(e.flush(timeout: 15)).to be(true)
      ids = back.received.flat_map { |r| JSON.parse(r.body)["exposures"].map { |x| x["subject"]["id"] } }
      expect(ids.sort).to eq((1..30).map { |i| "u#{i}" }.sort)
      expect(e.stats).to include(sent: 30, failed: 0, dropped: 0)
      e.close
    end
  end

  describe "fork" do
    it "waits for a slow in-flight batch instead of cutting it off: sent once, and a waiting flush tells the truth" do
      s = server { [:sleep, 0.6, [200, {}, "{}"]] }
      w = Exporter::Writer.new(transport: Exporter::Transport.new(url: s.url, timeout: 3), flush_interval: 60)
      (1..50).each { |i| w.write(SpanFactory.trace(i)) }
      flusher = Thread.new { w.flush(timeout: 10) }
      eventually { s.received.size == 1 } # the batch is in flight
      status = fork_and_wait { exit!(0) }
      expect(status).to be_success
      expect(flusher.join(15)&.value).to be(true)
      expect(s.trace_ids).to eq((1..50).to_a)
      expect(w.stats).to include(sent: 50, timed_out: 0)
      w.stop
    end
  end

  describe "fork (flag evaluations)" do
    it "waits for a slow in-flight POST of evaluation rows: each counted once" do
      s = EvpRecorder.new { [:sleep, 0.6, [202, {}, "{}"]] }
      (@servers ||= []) << s
      e = Exporter::FlagEvaluations.new(url: s.url, timeout: 3, flush_interval: 60)
      7.times { e.record(flag: "f", variant: "on", allocation: "a") }
      flusher = Thread.new { e.flush(timeout: 10) }
      eventually { s.received.size == 1 } # the rows are in flight
      expect(fork_and_wait { exit!(0) }).to be_success
      expect(flusher.join(15)&.value).to be(true)
      counts = s.bodies.flat_map { |b| b["flagEvaluations"] }.sum { |r| r["evaluation_count"] }
      expect(counts).to eq(7)
      e.close
    end
  end

  describe "objects dropped without stop or close" do
    def sockets = Dir.children("/proc/self/fd").count { |fd| File.readlink("/proc/self/fd/#{fd}").start_with?("socket:") rescue false } # rubocop:disable Style/RescueModifier

    def collect
      4.times { GC.start(full_mark: true, immediate_sweep: true) }
    end

    it "releases writers' flushers and connections, and transports' fork hooks" do
      s = server { ok }
      collect
      hooks_before = Exporter::AtFork.hooks(:before).size
      sockets_before = sockets
      # Built in another frame so no stack slot keeps them alive.
      make = lambda do
        100.times do |i|
          w = Exporter::Writer.new(transport: Exporter::Transport.new(url: s.url), flush_interval: 0.05)
          w.write(SpanFactory.trace(i + 1))
        end
        2_000.times { Exporter::Transport.new(url: s.url) }
        nil
      end
      make.call
      # Each dropped writer makes one last send of what it held.
      eventually(timeout: 15) do
        collect
        s.trace_ids.size >= 95 && Exporter::AtFork.hooks(:before).size <= hooks_before + 10
      end
      eventually(timeout: 15) do
        collect
        sockets <= sockets_before + 10
      end
      expect(Exporter::AtFork.hooks(:before).size).to be <= hooks_before + 10
      expect(s.trace_ids.uniq.size).to eq(s.trace_ids.size)
    end

    it "a finalizer that runs inside a registry update loses neither change" do
      handle = Exporter::AtFork.at_fork(:before) {}
      inner = nil
      Exporter::AtFork.send(:update) do |hooks|
        # What a finalizer run by GC here would do.
        inner ||= Exporter::AtFork.remove_at_fork(:before, handle)
        hooks.merge(parent: (hooks[:parent] + [Exporter::AtFork::Handle.new(:parent, -> {}, nil)]).freeze)
      end
      expect(inner).to be(true)
      expect(Exporter::AtFork.hooks(:before)).not_to include(handle)
      added = Exporter::AtFork.hooks(:parent).last
      expect(added.stage).to eq(:parent)
      Exporter::AtFork.remove_at_fork(:parent, added)
    end
  end

  describe "Process.daemon" do
    it "the daemon keeps and sends what was queued before it" do
      s = server { ok }
      r, wr = IO.pipe
      pid = fork do
        r.close
        w = Exporter::Writer.new(transport: Exporter::Transport.new(url: s.url), flush_interval: 60)
        (1..5).each { |i| w.write(SpanFactory.trace(i)) }
        Process.daemon(true, true)
        wr.puts(Process.pid)
        wr.puts(w.flush(timeout: 10))
        wr.close
        exit!(0)
      end
      wr.close
      expect(wait_bounded(pid)).to be_success # the parent of the daemon exits at once
      daemon_pid = Integer(r.gets)
      flushed = r.gets&.strip
      r.close
      expect(flushed).to eq("true")
      eventually_via_sidecar { s.trace_ids.size >= 5 }
      expect(s.trace_ids).to eq((1..5).to_a)
    ensure
      begin
        Process.kill(:KILL, daemon_pid) if daemon_pid
      rescue Errno::ESRCH
        nil
      end
    end
  end

  describe "exit" do
    it "reports once, per kind, what could not be sent within the exit bound" do
      dead = "http://127.0.0.1:#{TestAgent.free_port}"
      w = Exporter::Writer.new(transport: Exporter::Transport.new(url: dead, timeout: 0.1), flush_interval: 60)
      e = Exporter::Exposures.new(url: dead, timeout: 0.1, flush_interval: 60)
      f = Exporter::FlagEvaluations.new(url: dead, timeout: 0.1, flush_interval: 60)
      7.times { |i| w.write(SpanFactory.trace(i + 1)) }
      3.times { |i| e.record(flag: "f", allocation: "a", variant: "v", subject_id: "s#{i}") }
      5.times { f.record(flag: "f", variant: "on") }
      log = StringIO.new
      # This process's own objects only (as a sidecar listener, the spec
      # process also holds what earlier specs' children handed over).
      allow(Exporter::Sidecar).to receive_messages(flush: true, status: { counters: {} })
      unsent = Exporter::ExitFlush.run(timeout: 0.5, log: log)
      expect(unsent).to include("traces" => 7, "exposures" => 3, "flag evaluations" => 5)
      expect(log.string.lines.size).to eq(1)
      expect(log.string).to match(/at exit, 3 exposures, 5 flag evaluations, 7 traces could not be sent within 0.5 s.*connect failed/)
      w.stop(timeout: 0.1)
      e.close(timeout: 0.1)
      f.close(timeout: 0.1)
    end

    it "a short-lived process prints that line at exit" do
      dead = "http://127.0.0.1:#{TestAgent.free_port}"
      code = <<~RUBY
        require "exporter"
        w = Exporter::Writer.new(transport: Exporter::Transport.new(url: #{dead.inspect}, timeout: 0.1))
        4.times { |i| w.write([{ trace_id: i + 1, span_id: 1, name: "x" }]) }
      RUBY
      out, err, status = nil
      r, wr = IO.pipe
      pid = Process.spawn(ruby_bin, "-I", lib_dir, "-e", code, err: wr, out: File::NULL)
      wr.close
      status = wait_bounded(pid, timeout: 30)
      err = r.read
      r.close
      expect(status).to be_success
      expect(err.lines.grep(/at exit/).size).to eq(1)
      expect(err).to include("4 traces could not be sent")
      expect(out).to be_nil
    end
  end
end
