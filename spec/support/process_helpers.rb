# frozen_string_literal: true

require "rbconfig"

# Spawning and reaping processes with a bound: a hang fails the spec.
module ProcessHelpers
  # Waits for `pid` at most `timeout` seconds; past that, kills it (and its
  # process group when it leads one) and fails. Returns Process::Status.
  def wait_bounded(pid, timeout: 20)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      _, status = Process.waitpid2(pid, Process::WNOHANG)
      return status if status
      break if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.01
    end
    kill_hard(pid)
    raise "process #{pid} did not exit within #{timeout}s (killed)"
  end

  def kill_hard(pid)
    begin
      Process.kill(:KILL, -Process.getpgid(pid)) if Process.getpgid(pid) == pid
    rescue Errno::ESRCH, Errno::EPERM
      nil
    end
    begin
      Process.kill(:KILL, pid)
    rescue Errno::ESRCH
      nil
    end
    Process.waitpid(pid) rescue nil # rubocop:disable Style/RescueModifier
  end

  # Forks, runs the block in the child (exit status 0 unless it raises),
  # waits with a bound and returns the child's status.
  def fork_and_wait(timeout: 20, &block)
    pid = fork do
      code = 0
      begin
        block.call
      rescue Exception => e # rubocop:disable Lint/RescueException
        warn "child #{Process.pid} failed: #{e.class}: #{e.message}\n#{e.backtrace.first(5).join("\n")}"
        code = 1
      end
      exit!(code)
    end
    wait_bounded(pid, timeout: timeout)
  end

  # Runs argv (optional env Hash first) with its output captured, waits
  # with a bound (killed past it); returns [stdout, stderr, status].
  def capture_bounded(*argv, timeout: 30)
    out_r, out_w = IO.pipe
    err_r, err_w = IO.pipe
    pid = Process.spawn(*argv, out: out_w, err: err_w, pgroup: true)
    [out_w, err_w].each(&:close)
    readers = [out_r, err_r].map { |io| Thread.new { io.read } }
    status = wait_bounded(pid, timeout: timeout)
    [*readers.map(&:value), status]
  ensure
    [out_r, err_r].each { |io| io&.close unless io&.closed? }
  end

  def ruby_bin = RbConfig.ruby
  def lib_dir = File.expand_path("../../lib", __dir__)

  def monotonic = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  # Polls until the block is truthy or `timeout` passes; returns its value.
  def eventually(timeout: 10, interval: 0.02)
    deadline = monotonic + timeout
    loop do
      value = yield
      return value if value
      raise "condition not met within #{timeout}s" if monotonic > deadline

      sleep interval
    end
  end
end

# With the sidecar on (EXPORTER_SIDECAR=auto, the default), a forked
# child's `flush` returns once the spec process's listener holds what it
# wrote; the listener sends it right after. Waits for `yield` to be
# truthy, asking the listener to flush meanwhile (a no-op with the sidecar
# off, or with no listener).
module SidecarHelpers
  def eventually_via_sidecar(timeout: 15, &block)
    eventually(timeout: timeout, interval: 0.05) do
      Exporter::Sidecar.flush(timeout: 0.2)
      block.call
    end
  end
end
