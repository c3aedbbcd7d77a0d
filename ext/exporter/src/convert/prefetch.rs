//! Reading ahead of the span being converted.
//!
//! Converting a span follows a chain of pointers: the span Hash, its table,
//! the table's entries, then the objects they hold (ids, Strings, the meta
//! and metrics Hashes). A trace written long after it was built is not in
//! cache (the benchmark's flat-out pool, a busy app), so each link is a
//! cache miss waited for in turn: `perf` put most of `Writer#write`'s time
//! on the loads of the span object, its table and its entries.
//!
//! So before each span, [`ahead`] asks for one link of each of the next
//! four spans, each a link further than one span before: by the time a
//! span is converted its chain is in cache, and the misses overlap the
//! conversion of the spans before it. Measured (paired runs, a fresh
//! process each, `bench/run_one.rb alone writer`): calling-thread CPU per
//! span 12% lower flat out on `ddtrace` ids and 26% on `random64` (their
//! Bignum ids are objects of their own), 4% higher on traces already in
//! cache (~245 more instructions per span). Walking the meta and metrics
//! Hashes ahead too, or several spans a level at a time, cost more than
//! it saved.
//!
//! Only reads, of what [`super::walk`] itself reads, with the same layout
//! (checked at load; where it was not, nothing is read ahead); anything
//! not recognized is skipped, the conversion then reports it. A prefetch
//! never faults, whatever the address.

use super::{HASH_AR_BOUND_SHIFT, HASH_ST, WALK};
use magnus::rb_sys::AsRawValue;
use magnus::Value;
use std::sync::atomic::Ordering;

const LINE: usize = 64;
/// Entries of a span prefetched (and whose values are) at most.
const MAX_ENTRIES: usize = 40;

const T_MASK: usize = rb_sys::ruby_value_type::RUBY_T_MASK as usize;
const T_HASH: usize = rb_sys::ruby_value_type::RUBY_T_HASH as usize;

#[inline(always)]
fn prefetch(address: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

fn prefetch_bytes(start: usize, len: usize) {
    let mut line = start & !(LINE - 1);
    while line < start.saturating_add(len) {
        prefetch(line);
        line += LINE;
    }
}

/// Whether `v` is an object's address (see [`super::is_object`]).
#[inline(always)]
fn object(v: usize) -> bool {
    super::is_object(v as rb_sys::VALUE)
}

/// Word `i` of the object at `v`.
///
/// SAFETY: `v` is a live object (every object has at least 5 words).
#[inline(always)]
unsafe fn word(v: usize, i: usize) -> usize {
    unsafe { (v as *const usize).add(i).read() }
}

/// Calls `f` with the values of `h`'s entries (a deleted entry's stale
/// value too: only ever prefetched, which never faults).
///
/// SAFETY: `h` is a live Hash with a table.
#[inline(always)]
unsafe fn each_value(h: usize, mut f: impl FnMut(usize)) {
    // SAFETY: see `walk`.
    unsafe {
        let flags = word(h, 0);
        let table = word(h, 2);
        if flags & HASH_ST == 0 {
            let bound = (flags >> HASH_AR_BOUND_SHIFT) & 0xf;
            let pairs = table as *const [usize; 2];
            for i in 0..bound.min(8) {
                f(pairs.add(i).read()[1]);
            }
        } else {
            let st = &*(table as *const rb_sys::st_table);
            let entries = st.entries as *const [usize; 3];
            let end = (st.entries_bound as usize).min(st.entries_start as usize + MAX_ENTRIES);
            for i in st.entries_start as usize..end {
                f(entries.add(i).read()[2]);
            }
        }
    }
}

/// Prefetches, for the span converted next (`spans[at]`), one level of
/// each of the spans after it: the object of the fourth next, the table
/// of the third, the entries of the second, and the objects the next one
/// holds (ids, Strings, the meta and metrics Hashes). Each level was asked
/// for one span earlier, so what is read to find the next is in cache by
/// then, and the misses overlap the conversion of the spans before.
///
/// SAFETY: `spans` are the live elements of a trace Array, and no Ruby code
/// runs during the call.
#[inline(always)]
pub(super) unsafe fn ahead(spans: &[Value], at: usize) {
    if !WALK.load(Ordering::Relaxed) {
        return;
    }
    let span = |d: usize| {
        spans
            .get(at + d)
            .map(|v| v.as_raw() as usize)
            .filter(|&v| object(v))
    };
    // SAFETY (each level): live objects held by the level above, whose
    // memory was asked for one span earlier.
    unsafe {
        if let Some(v) = span(4) {
            prefetch(v);
        }
        if let Some(h) = span(3).and_then(|v| hash(v)) {
            let table = word(h, 2);
            prefetch(table);
            prefetch(table + LINE);
        }
        if let Some(h) = span(2).and_then(|v| hash(v)) {
            st_entries(h);
        }
        if let Some(h) = span(1).and_then(|v| hash(v)) {
            each_value(h, |v| {
                if object(v) {
                    prefetch(v)
                }
            });
        }
    }
}

/// `v` if it is a Hash with a table.
///
/// SAFETY: `v` is a live object.
#[inline(always)]
unsafe fn hash(v: usize) -> Option<usize> {
    // SAFETY: a live object's flags; a Hash's table pointer.
    unsafe { (word(v, 0) & T_MASK == T_HASH && word(v, 2) != 0).then_some(v) }
}

/// Prefetches the entries of `h` if its table is an st_table.
///
/// SAFETY: `h` is a live Hash with a table.
#[inline(always)]
unsafe fn st_entries(h: usize) {
    // SAFETY: as in `walk`: an st_table's entries, {hash, key, value}
    // each, from entries_start to entries_bound.
    unsafe {
        if word(h, 0) & HASH_ST != 0 {
            let st = &*(word(h, 2) as *const rb_sys::st_table);
            let size = std::mem::size_of::<[usize; 3]>();
            let start = st.entries as usize + st.entries_start as usize * size;
            let len = (st.entries_bound - st.entries_start) as usize * size;
            prefetch_bytes(start, len.min(MAX_ENTRIES * size));
        }
    }
}
