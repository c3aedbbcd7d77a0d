# frozen_string_literal: true

module Exporter
  # Drives the native runtime's fork lifecycle from the at_fork hooks.
  #
  # Registered once, first, so that (hooks run like pthread_atfork's) its
  # :before runs after every transport has taken its send lock, and its
  # :parent/:child run before the transports release theirs.
  module Runtime
    class << self
      def install!
        return if @installed

        AtFork.at_fork(:before, owner: self) { Native.before_fork }
        AtFork.at_fork(:parent, owner: self) { Native.after_fork_parent }
        AtFork.at_fork(:child, owner: self) do
          # After Process.daemon the parent is gone: keep what it queued.
          AtFork.daemon_child? ? Native.after_daemon : Native.after_fork_child
        end
        @installed = true
      end

      # Outside a fork, a runtime still paused for one means an exception
      # cut the fork's :parent hooks short (AtFork.around_fork makes that
      # all but impossible); at exit, before the last flush, this resumes
      # it so that nothing queued is lost. True when it had to.
      def resume_if_left_paused
        return false unless Native.fork_in_progress?

        Native.after_fork_parent
        true
      end

      def running? = Native.runtime_running?
      def thread_count = Native.runtime_thread_count
    end
  end
end
