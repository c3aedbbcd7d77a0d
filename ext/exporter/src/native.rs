//! `Exporter::Native`: the runtime's fork lifecycle, called by the
//! transport's at_fork hooks, plus introspection used by the specs.

use std::ffi::c_void;

use exporter_core::{runtime, sidecar};
use magnus::{function, prelude::*, Error, RModule};

/// `runtime::before_fork` with the GVL released: it waits for background
/// workers to finish the attempt in flight (up to its timeout), and other
/// Ruby threads (a server thread answering that request among them) must
/// not freeze meanwhile. Nothing of Ruby is touched while it runs.
fn before_fork() {
    unsafe extern "C" fn run(data: *mut c_void) -> *mut c_void {
        // SAFETY: `data` is the `bool` of the caller's frame, alive for the
        // whole call, touched by no one else meanwhile.
        let ran = unsafe { &mut *(data as *mut bool) };
        // Never unwind into Ruby's C frames.
        let _ = std::panic::catch_unwind(before_fork_native);
        *ran = true;
        std::ptr::null_mut()
    }
    let mut ran = false;
    // SAFETY: v2 (never v1: no longjmp through Rust frames), no unblocking
    // function: the work is bounded and must not be cut short. `ran` lives
    // on this frame until the call returns.
    unsafe {
        rb_sys::rb_thread_call_without_gvl2(
            Some(run),
            std::ptr::addr_of_mut!(ran) as *mut c_void,
            None,
            std::ptr::null_mut(),
        );
    }
    if !ran {
        // An interrupt was pending, so v2 did not run it: the fork must
        // still find no thread of ours alive.
        before_fork_native();
    }
}

/// The sidecar first (it may register its listener, and makes the child's
/// socketpair), then the runtime stops every worker, the listener too.
fn before_fork_native() {
    sidecar::before_fork();
    runtime::before_fork();
}

/// The runtime restarts its workers (the listener serves its connections
/// again), then the listener adopts the new child's connection.
fn after_fork_parent() {
    runtime::after_fork_parent();
    sidecar::after_fork_parent();
}

/// The sidecar first (the child becomes a client before its flushers
/// start), then the runtime starts afresh.
fn after_fork_child() {
    sidecar::after_fork_child();
    runtime::after_fork_child();
}

fn after_daemon() {
    sidecar::after_daemon();
    runtime::after_daemon();
}

pub fn init(module: RModule) -> Result<(), Error> {
    let native = module.define_module("Native")?;
    native.define_singleton_method("before_fork", function!(before_fork, 0))?;
    native.define_singleton_method("after_fork_parent", function!(after_fork_parent, 0))?;
    native.define_singleton_method("after_fork_child", function!(after_fork_child, 0))?;
    native.define_singleton_method("after_daemon", function!(after_daemon, 0))?;
    native.define_singleton_method("sidecar_test_stall", function!(sidecar::test_stall, 1))?;
    native.define_singleton_method("exiting", function!(sidecar::client::exiting, 0))?;
    native.define_singleton_method("runtime_running?", function!(runtime::is_running, 0))?;
    native.define_singleton_method("fork_in_progress?", function!(runtime::fork_in_progress, 0))?;
    native.define_singleton_method("runtime_generation", function!(runtime::generation, 0))?;
    native.define_singleton_method("runtime_thread_count", function!(runtime::thread_count, 0))?;
    native.define_singleton_method(
        "hash_iteration",
        function!(crate::convert::hash_iteration, 0),
    )?;
    native.define_singleton_method(
        "bignum_reading",
        function!(crate::convert::bignum_reading, 0),
    )?;
    Ok(())
}
