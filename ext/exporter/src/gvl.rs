//! Waiting for native work without holding the GVL.
//!
//! The protocol (see DESIGN.md, "Releasing the GVL"):
//! - `rb_thread_call_without_gvl2`, never v1 (v1 longjmps through Rust
//!   frames), itself wrapped in `rb_protect` because v2 can still raise;
//! - the unblock function (UBF) runs on another thread; it only cancels a
//!   heap-allocated `CancellationToken` that outlives the call;
//! - v2 may return without running the function: then, and whenever the UBF
//!   woke the wait, `rb_thread_check_ints` runs. If it raises (kill, raise,
//!   Timeout), the native work is cancelled and the exception propagates
//!   after Rust cleanup; if it does not (a trapped signal ran its handler),
//!   the wait resumes: a signal never drops the work;
//! - panics inside the no-GVL function become Ruby exceptions.
//!
//! The work itself runs elsewhere (a task on the shared runtime); only the
//! *wait* for its result is interrupted.

use std::ffi::c_void;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::task::Poll;

use exporter_core::block_on::block_on;

use magnus::rb_sys::AsRawValue;
use magnus::value::ReprValue;
use magnus::{Error, Ruby};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// What one no-GVL call did.
enum Outcome<T> {
    /// v2 returned without running the function (an interrupt was pending).
    NotRun,
    /// The UBF cancelled the wait.
    Interrupted,
    /// The result arrived (or its sender was dropped).
    Done(Result<T, oneshot::error::RecvError>),
    Panicked(String),
}

struct Call<'a, T> {
    rx: &'a mut oneshot::Receiver<T>,
    /// Owned by `wait`, freed only after the no-GVL call has returned.
    wake: *const CancellationToken,
    outcome: Outcome<T>,
}

/// Runs without the GVL: waits for the result or for the UBF.
unsafe extern "C" fn run_without_gvl<T>(data: *mut c_void) -> *mut c_void {
    // SAFETY: `data` is the `Call` owned by `wait`'s frame, which outlives
    // this call; no other thread touches it while we run.
    let call = unsafe { &mut *(data as *mut Call<'_, T>) };
    // SAFETY: the token is boxed by `wait` and freed after this returns.
    let wake = unsafe { &*call.wake };
    let rx = &mut *call.rx;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut cancelled = pin!(wake.cancelled());
        block_on(std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = std::pin::Pin::new(&mut *rx).poll(cx) {
                return Poll::Ready(Some(r));
            }
            cancelled.as_mut().poll(cx).map(|_| None)
        }))
    }));
    call.outcome = match result {
        Ok(Some(r)) => Outcome::Done(r),
        Ok(None) => Outcome::Interrupted,
        Err(p) => Outcome::Panicked(panic_message(&p)),
    };
    std::ptr::null_mut()
}

/// The unblock function: called by Ruby, on another thread, to interrupt.
unsafe extern "C" fn unblock(data: *mut c_void) {
    // SAFETY: `data` is the boxed token, alive until the call has returned,
    // and Ruby only calls the UBF while the call is in progress.
    let token = unsafe { &*(data as *const CancellationToken) };
    // Never unwind into Ruby; `cancel` does not panic in practice.
    let _ = catch_unwind(AssertUnwindSafe(|| token.cancel()));
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    exporter_core::log::panic_message(&**p)
}

/// What became of work run with [`run`].
pub enum Ran<T> {
    Done(T),
    /// Abandoned by a fork (see [`wait`]).
    Abandoned,
    /// The runtime could not be used.
    NoRuntime(exporter_core::runtime::RuntimeError),
}

/// Runs the future `make(generation)` on the shared runtime and waits for
/// it without the GVL (see [`wait`]). An exception raised meanwhile cancels
/// the future and is returned.
pub fn run<T, F>(ruby: &Ruby, make: impl FnOnce(u64) -> F) -> Result<Ran<T>, Error>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (handle, generation) = match exporter_core::runtime::handle() {
        Ok(h) => h,
        Err(e) => return Ok(Ran::NoRuntime(e)),
    };
    let work = CancellationToken::new();
    let cancelled = work.clone();
    let (tx, rx) = oneshot::channel();
    let fut = make(generation);
    handle.spawn(async move {
        tokio::select! {
            v = fut => { let _ = tx.send(v); }
            _ = cancelled.cancelled() => {}
        }
    });
    Ok(match wait(ruby, rx, &work)? {
        Some(v) => Ran::Done(v),
        None => Ran::Abandoned,
    })
}

/// Waits for `rx` without the GVL. If a Ruby interrupt raises meanwhile,
/// `work` is cancelled and the exception is returned, to be re-raised by
/// magnus once every Rust frame has been dropped.
///
/// `Ok(None)` means the work was abandoned: its runtime was stopped by a
/// fork that could not wait for it (a fork from a trap handler), or this is
/// a child forked during the wait, where the work belongs to the parent.
pub fn wait<T>(
    ruby: &Ruby,
    mut rx: oneshot::Receiver<T>,
    work: &CancellationToken,
) -> Result<Option<T>, Error> {
    let pid = std::process::id();
    loop {
        let wake = Box::new(CancellationToken::new());
        let wake_ptr: *const CancellationToken = &*wake;
        let mut call = Call {
            rx: &mut rx,
            wake: wake_ptr,
            outcome: Outcome::NotRun,
        };
        let call_ptr = std::ptr::addr_of_mut!(call) as *mut c_void;
        let qnil = ruby.qnil().as_value().as_raw();
        let raised = magnus::rb_sys::protect(|| {
            // SAFETY: both pointers stay valid for the whole call (see
            // `Call` and `unblock`); the closure owns nothing with a Drop,
            // so a longjmp out of it skips no destructor.
            unsafe {
                rb_sys::rb_thread_call_without_gvl2(
                    Some(run_without_gvl::<T>),
                    call_ptr,
                    Some(unblock),
                    wake_ptr as *mut c_void,
                );
            }
            qnil
        });
        let outcome = std::mem::replace(&mut call.outcome, Outcome::NotRun);
        drop(wake);
        if let Err(e) = raised {
            work.cancel();
            return Err(e);
        }
        match outcome {
            Outcome::Done(Ok(v)) => return Ok(Some(v)),
            Outcome::Done(Err(_)) => return Ok(None),
            Outcome::Panicked(msg) => {
                work.cancel();
                return Err(Error::new(
                    ruby.exception_runtime_error(),
                    format!("exporter: native panic: {msg}"),
                ));
            }
            Outcome::Interrupted | Outcome::NotRun => {
                if let Err(e) = ruby.thread_check_ints() {
                    work.cancel();
                    return Err(e);
                }
                if std::process::id() != pid {
                    // A trap handler forked and we are the child.
                    std::mem::forget(rx);
                    return Ok(None);
                }
                // A trapped signal (or a spurious wake-up): wait again.
            }
        }
    }
}
