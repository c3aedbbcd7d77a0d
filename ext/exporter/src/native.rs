//! `Exporter::Native`: the runtime's fork lifecycle, called by the
//! transport's at_fork hooks, plus introspection used by the specs.

use exporter_core::runtime;
use magnus::{function, prelude::*, Error, RModule};

pub fn init(module: RModule) -> Result<(), Error> {
    let native = module.define_module("Native")?;
    native.define_singleton_method("before_fork", function!(runtime::before_fork, 0))?;
    native.define_singleton_method(
        "after_fork_parent",
        function!(runtime::after_fork_parent, 0),
    )?;
    native.define_singleton_method("after_fork_child", function!(runtime::after_fork_child, 0))?;
    native.define_singleton_method("after_daemon", function!(runtime::after_daemon, 0))?;
    native.define_singleton_method("runtime_running?", function!(runtime::is_running, 0))?;
    native.define_singleton_method("runtime_generation", function!(runtime::generation, 0))?;
    native.define_singleton_method("runtime_thread_count", function!(runtime::thread_count, 0))?;
    native.define_singleton_method(
        "hash_iteration",
        function!(crate::convert::hash_iteration, 0),
    )?;
    Ok(())
}
