//! Storage handed back by the thread that consumed it to the thread that
//! fills it.
//!
//! A trace is converted into storage on the application's thread and
//! encoded, then freed, on the runtime's. Under load the allocator then
//! serves the application memory last touched long before (cache misses
//! on every line written) from an arena whose lock those frees contend
//! for. A [`Recycler`] closes the loop: the consumer gives back what it is
//! done with, the producer takes the most recently given, emptied, with
//! its capacity: storage still in cache, and no allocation once sizes
//! settle (`span::TRACE_POOL`: the writer's calling-thread CPU per span
//! fell by a tenth, paired runs of `bench/run_one.rb alone writer`).
//! Small buffers did not gain: taking an exposure's buffer from a
//! recycler costs about what `malloc` does (callgrind, and paired runs of
//! `bench/run_one.rb record`: 0.96, within noise). A flag evaluation is
//! instead packed into a buffer the calling thread keeps and copied into
//! the worker's one byte queue (`flags::packed`), which did gain.
//!
//! Bounded by the bytes it holds, and it never waits: when its lock is
//! taken (or was left taken by a thread that did not survive a fork)
//! storage is simply allocated or freed as usual.

use std::sync::Mutex;

/// Storage a [`Recycler`] can keep: emptied, its capacity kept.
pub trait Reusable {
    /// The bytes of storage it holds.
    fn capacity_bytes(&self) -> usize;
    /// Empties it, keeping its storage.
    fn clear(&mut self);
}

impl Reusable for Vec<u8> {
    fn capacity_bytes(&self) -> usize {
        self.capacity()
    }

    fn clear(&mut self) {
        Vec::clear(self)
    }
}

/// A bounded LIFO of emptied storage (see the module doc).
#[derive(Debug)]
pub struct Recycler<T> {
    /// The storage kept, and the bytes it holds.
    free: Mutex<(Vec<T>, usize)>,
    max_bytes: usize,
}

impl<T: Reusable> Recycler<T> {
    /// A recycler keeping at most `max_bytes` of storage.
    pub const fn new(max_bytes: usize) -> Recycler<T> {
        Recycler {
            free: Mutex::new((Vec::new(), 0)),
            max_bytes,
        }
    }

    /// The storage given back last, emptied; `None` when there is none (or
    /// the recycler is busy): the caller allocates.
    pub fn take(&self) -> Option<T> {
        let mut free = self.free.try_lock().ok()?;
        let t = free.0.pop()?;
        free.1 -= t.capacity_bytes();
        Some(t)
    }

    /// Keeps the storage of `items` while within the bound (emptied);
    /// frees the rest.
    pub fn give(&self, items: impl IntoIterator<Item = T>) {
        let Ok(mut free) = self.free.try_lock() else {
            return;
        };
        for mut t in items {
            let bytes = t.capacity_bytes();
            if bytes == 0 || free.1 + bytes > self.max_bytes {
                continue;
            }
            t.clear();
            free.1 += bytes;
            free.0.push(t);
        }
    }

    /// The storage kept (for tests and stats).
    pub fn len(&self) -> usize {
        self.free.lock().map_or(0, |f| f.0.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_back_the_last_storage_emptied_within_its_bound() {
        let r: Recycler<Vec<u8>> = Recycler::new(1000);
        assert_eq!(r.take(), None, "nothing kept yet");
        let older = Vec::with_capacity(100);
        let mut newer = Vec::with_capacity(200);
        newer.extend_from_slice(b"some bytes");
        let newer_at = newer.as_ptr();
        r.give([older, newer, Vec::new()]);
        assert_eq!(r.len(), 2, "storage without capacity is not kept");
        // Most recently given first, emptied, its storage kept.
        let t = r.take().unwrap();
        assert_eq!((t.as_ptr(), t.len()), (newer_at, 0));
        assert!(t.capacity() >= 200);
        // Beyond the bound, storage is freed.
        r.give([Vec::with_capacity(950)]);
        assert_eq!(r.len(), 1);
        r.give([t]);
        assert_eq!(r.len(), 2);
        // Busy: not waited for.
        let held = r.free.lock().unwrap();
        assert_eq!(r.take(), None);
        r.give([Vec::with_capacity(10)]);
        drop(held);
        assert_eq!(r.len(), 2);
    }
}
