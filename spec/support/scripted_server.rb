# frozen_string_literal: true

require "msgpack"
require "socket"

# A tiny HTTP/1.1 server of our own, for what the test agent cannot do:
# chosen statuses, Retry-After, slow answers, never answering. Runs in a
# Ruby thread of the spec process (which works only because sends release
# the GVL). `script` gets the request number (0-based) and returns
# [status, headers, body], :hang (read, never answer) or [:sleep, secs, response].
class ScriptedServer
  Request = Struct.new(:method, :path, :headers, :body, :at, keyword_init: true)

  attr_reader :requests, :port

  # `port: 0` picks a free port; give the port of a closed server to
  # restart "the agent" where clients expect it.
  def initialize(port: 0, &script)
    @script = script
    @server = TCPServer.new("127.0.0.1", port)
    @port = @server.addr[1]
    @requests = Queue.new
    @count = 0
    @lock = Mutex.new
    @clients = []
    @thread = Thread.new { accept_loop }
  end

  def url = "http://127.0.0.1:#{port}"

  def received
    list = []
    list << @requests.pop until @requests.empty?
    list.each { |r| @requests << r }
    list
  end

  # Trace ids of every trace in the v0.4 bodies of `requests` (all
  # received by default), in order (a trace sent twice appears twice).
  def trace_ids(requests = received)
    requests.select { |r| r.path == "/v0.4/traces" }.flat_map do |r|
      MessagePack.unpack(r.body).map { |trace| trace.first["trace_id"] }
    end
  end

  def close
    @thread.kill
    @server.close rescue nil # rubocop:disable Style/RescueModifier
    @lock.synchronize { @clients.each { |t| t.kill } }
  end

  private

  def accept_loop
    loop do
      sock = @server.accept
      @lock.synchronize { @clients << Thread.new(sock) { |s| serve(s) } }
    end
  rescue IOError, Errno::EBADF
    nil
  end

  def serve(sock)
    loop do
      line = sock.gets or break
      method, path, = line.split(" ")
      headers = {}
      while (h = sock.gets) && h != "\r\n"
        k, v = h.split(":", 2)
        headers[k.strip.downcase] = v.strip
      end
      body = sock.read(headers.fetch("content-length", "0").to_i)
      n = @lock.synchronize { (@count += 1) - 1 }
      @requests << Request.new(method: method, path: path, headers: headers, body: body,
                               at: Process.clock_gettime(Process::CLOCK_MONOTONIC))
      action = @script.call(n)
      if action == :hang
        sleep
      elsif action.is_a?(Array) && action[0] == :sleep
        sleep action[1]
        action = action[2]
      end
      status, extra, payload = action
      payload ||= ""
      head = ["HTTP/1.1 #{status} X", "Content-Length: #{payload.bytesize}", "Content-Type: application/json"]
      extra&.each { |k, v| head << "#{k}: #{v}" }
      sock.write("#{head.join("\r\n")}\r\n\r\n#{payload}")
    end
  rescue IOError, SystemCallError
    nil
  ensure
    sock.close rescue nil # rubocop:disable Style/RescueModifier
  end
end
