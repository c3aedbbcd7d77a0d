# frozen_string_literal: true

module Exporter
  # Fork hooks: `:before` (parent, before fork), `:parent` (parent, after
  # fork, also when it failed, to undo `:before`) and `:child` (child).
  #
  # Installed once, on require, by patching `Process._fork` (Ruby >= 3.1,
  # which `Kernel#fork`, `Process.fork` and `IO.popen("-")` go through) and
  # `Process.daemon` (which forks in C: it runs `:before`, then `:child`).
  #
  # As with pthread_atfork, `:before` hooks run in reverse registration
  # order and `:parent`/`:child` hooks in registration order, so a hook
  # registered early (the runtime's) brackets the ones registered after it
  # (the transports' send locks).
  #
  # The registry is copy-on-write: running hooks never locks, so forking
  # from a trap handler works.
  module AtFork
    STAGES = %i[before parent child].freeze

    # What `at_fork` returns; pass it to `remove_at_fork`. Hooks that share
    # an `owner` are paired: when a :before hook raises, only the :parent
    # hooks of owners whose :before already ran are run to undo it.
    Handle = Struct.new(:stage, :callable, :owner)

    @hooks = STAGES.to_h { |s| [s, [].freeze] }.freeze
    @lock = Mutex.new

    class << self
      def at_fork(stage, callable = nil, owner: nil, &block)
        check_stage(stage)
        callable ||= block
        raise ArgumentError, "at_fork needs a block or a callable" unless callable.respond_to?(:call)

        handle = Handle.new(stage, callable, owner).freeze
        update { |hooks| hooks.merge(stage => (hooks[stage] + [handle]).freeze) }
        handle
      end

      # Returns true when the hook was registered.
      def remove_at_fork(stage, handle)
        check_stage(stage)
        removed = false
        update do |hooks|
          list = hooks[stage].reject { |h| h.equal?(handle) }
          removed = list.size != hooks[stage].size
          hooks.merge(stage => list.freeze)
        end
        removed
      end

      def hooks(stage)
        @hooks.fetch(stage)
      end

      # Runs the :before hooks, yields (the fork itself), then the :child
      # hooks in a child, or the :parent hooks otherwise (also when the
      # fork or a :before hook raised). Returns what the block returned.
      #
      # A trap handler runs at any interrupt check of this thread and may
      # raise (Puma's master does: its SIGTERM handler stops the workers,
      # then raises SignalException wherever the main thread was), and
      # Thread.handle_interrupt does not defer it. So whatever is raised
      # and wherever: every :parent hook whose owner's :before began runs
      # (a :before cut short is undone too; the :parent hooks tolerate an
      # incomplete :before), and one that raises does not stop the others.
      # Otherwise the runtime would stay paused for good and what the
      # listener holds would be lost at exit.
      def around_fork(daemon: false)
        begun = []
        all_begun = false
        raised = true
        result = nil
        begin
          hooks(:before).reverse_each do |h|
            begun << h.owner
            h.callable.call
          end
          all_begun = true
          result = yield
          raised = false
        ensure
          undo(all_begun ? nil : begun, raised) unless result&.zero?
        end
        run_child(daemon: daemon) if result.zero?
        result
      end

      # Runs :parent hooks (all, or those of `only_owners`); each runs even
      # if one before it raised, and the first error is raised at the end.
      def run_parent(only_owners: nil)
        error = nil
        hooks(:parent).each do |h|
          next if only_owners && !only_owners.include?(h.owner)

          begin
            h.callable.call
          rescue Exception => e # rubocop:disable Lint/RescueException
            error ||= e
          end
        end
        raise error if error

        nil
      end

      # Runs the :parent hooks after a fork (of `owners`, or all). While an
      # exception propagates (`raised`: what stopped the fork), an error of
      # theirs does not replace it.
      def undo(owners, raised)
        run_parent(only_owners: owners)
      rescue Exception # rubocop:disable Lint/RescueException
        raise unless raised
      end

      # Runs :child hooks. `daemon: true` in the process that continues
      # after `Process.daemon` (its parent has exited): what was queued
      # before is now this process's to send.
      def run_child(daemon: false)
        @daemon_child = daemon
        hooks(:child).each { |h| h.callable.call }
        nil
      ensure
        @daemon_child = false
      end

      # True while :child hooks run after `Process.daemon`.
      def daemon_child? = @daemon_child == true

      private

      def check_stage(stage)
        return if STAGES.include?(stage)

        raise ArgumentError, "unknown at_fork stage #{stage.inspect} (expected one of #{STAGES.inspect})"
      end

      # Replaces the registry with `yield(current)`. The lock orders
      # updates between threads. A finalizer (a collected Transport
      # removing its hooks) can run inside an update on the same thread,
      # during an allocation of the block: it cannot take the lock
      # (ThreadError) and updates directly; the outer update then sees the
      # registry changed under it and recomputes, so neither change is lost.
      def update(&block)
        @lock.synchronize { swap(&block) }
      rescue ThreadError
        # Recursive (finalizer) or in a trap handler, where Mutex is
        # forbidden: both run on this thread with the GVL held.
        swap(&block)
      end

      def swap
        loop do
          before = @hooks
          after = yield(before).freeze
          next unless @hooks.equal?(before)

          @hooks = after
          return
        end
      end
    end

    # The patch prepended to Process's singleton class.
    module ProcessPatch
      def _fork
        AtFork.around_fork { super }
      end

      # `Process.daemon` returns 0 in the process that continues: its
      # :child hooks run with `daemon_child?` true.
      def daemon(*args)
        AtFork.around_fork(daemon: true) { super }
      end
    end

    def self.install!
      return if @installed

      Process.singleton_class.prepend(ProcessPatch)
      @installed = true
    end
  end
end
