# frozen_string_literal: true

require "fiddle"
require "json"
require "open3"
require "tmpdir"

# Per-user sidecar helpers (exporter-sidecar) started by spec processes.
# Each spec gives its clients an XDG_RUNTIME_DIR of its own, so helpers
# never collide with each other or with a real one. The helper detaches
# (its launcher exits), so it would be re-parented to init, which does not
# reap on every machine: while these specs run, the rspec process is a
# child subreaper (prctl), so every helper its children start becomes its
# child: reaped here with a bound (its exit status checked), killed in an
# `after` if still alive.
module HelperProcesses
  PR_SET_CHILD_SUBREAPER = 36
  HELPER = File.expand_path("../../lib/exporter/exporter-sidecar", __dir__)

  module_function

  def subreaper(on)
    libc = Fiddle.dlopen(nil)
    prctl = Fiddle::Function.new(libc["prctl"], [Fiddle::TYPE_INT, Fiddle::TYPE_LONG, Fiddle::TYPE_LONG,
                                                 Fiddle::TYPE_LONG, Fiddle::TYPE_LONG], Fiddle::TYPE_INT)
    raise "prctl(PR_SET_CHILD_SUBREAPER) failed" unless prctl.call(PR_SET_CHILD_SUBREAPER, on ? 1 : 0, 0, 0, 0).zero?
  end

  # [state, ppid] of a live process, nil when it is gone.
  def proc_state(pid)
    stat = File.read("/proc/#{pid}/stat")
    fields = stat[(stat.rindex(")") + 2)..].split
    [fields[0], fields[1].to_i]
  rescue Errno::ENOENT, Errno::ESRCH
    nil
  end

  # Pids of helper processes serving a socket under `dir` (zombies too
  # with `zombies: true`).
  def helper_pids(dir, zombies: false)
    Dir.children("/proc").grep(/\A\d+\z/).filter_map do |pid|
      state, = proc_state(pid)
      next if state.nil? || (state == "Z" && !zombies)
      next if state == "Z" ? !zombie_helper?(pid) : !serving?(pid, dir)

      pid.to_i
    rescue Errno::ENOENT, Errno::ESRCH
      nil
    end
  end

  def serving?(pid, dir)
    argv = File.read("/proc/#{pid}/cmdline").split("\0")
    File.basename(argv[0].to_s) == "exporter-sidecar" &&
      argv.each_cons(2).any? { |k, v| k == "--socket" && v.start_with?(File.join(dir, "")) }
  end

  # A zombie has no cmdline left: its name, and that it is our child.
  def zombie_helper?(pid)
    File.read("/proc/#{pid}/comm").start_with?("exporter-sideca") && proc_state(pid)&.last == Process.pid
  end

  # Pids of zombie children of `parent`.
  def zombie_children(parent)
    Dir.children("/proc").grep(/\A\d+\z/).select do |pid|
      state, ppid = proc_state(pid)
      state == "Z" && ppid == parent
    end.map(&:to_i)
  end

  # Kills (SIGKILL) every helper under `dir` and reaps, with a bound, those
  # that are our children (as subreaper), zombies of ours included.
  def kill_helpers(dir)
    live = helper_pids(dir)
    live.each do |pid|
      Process.kill(:KILL, pid)
    rescue Errno::ESRCH
      nil
    end
    (live + helper_pids(dir, zombies: true)).uniq.each { |pid| reap(pid, timeout: 5) }
  end

  # Waits for `pid` (a child of ours) at most `timeout` s; its status, or
  # nil when it is not our child.
  def reap(pid, timeout:)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      _, status = Process.waitpid2(pid, Process::WNOHANG)
      return status if status
      raise "helper #{pid} did not exit within #{timeout}s" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.01
    end
  rescue Errno::ECHILD
    nil
  end
end
