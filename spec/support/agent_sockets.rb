# frozen_string_literal: true

require "set"

# Which processes hold a TCP connection to a port, read from /proc: the
# socket inodes among a process's fds, matched against the established
# connections of /proc/<pid>/net/tcp{,6}.
module AgentSockets
  ESTABLISHED = "01"

  module_function

  # Established TCP connections of `pid` whose remote port is `port`.
  def connections(pid, port)
    inodes = socket_inodes(pid)
    %w[tcp tcp6].sum do |file|
      File.readlines("/proc/#{pid}/net/#{file}").drop(1).count do |line|
        f = line.split
        f[3] == ESTABLISHED && f[2].split(":").last.to_i(16) == port && inodes.include?(f[9])
      end
    rescue Errno::ENOENT
      0
    end
  end

  def socket_inodes(pid)
    Dir.children("/proc/#{pid}/fd").filter_map do |fd|
      File.readlink("/proc/#{pid}/fd/#{fd}")[/\Asocket:\[(\d+)\]\z/, 1]
    rescue Errno::ENOENT
      nil
    end.to_set
  end
end
