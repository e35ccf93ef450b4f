//! A global allocator that counts live bytes, so a target can assert how much memory one call
//! may hold at its peak: the bound the server states is a promise about allocations, and the
//! operating system's RSS is too coarse (and too slow to read per input) to check it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting. Install with
/// `#[global_allocator] static ALLOC: CountingAlloc = CountingAlloc;`.
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrank(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only the counters are added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // A moving realloc holds both blocks for a moment; count the larger one, as a
            // copy into a fresh block would peak at old + new.
            grew(new_size);
            shrank(layout.size());
        }
        new
    }
}

/// Runs `f` and returns its result with the most bytes that were live at once during the call
/// beyond those live before it. Only meaningful with [`CountingAlloc`] installed, and on one
/// thread: allocations of other threads in the meantime count too (never less than the truth).
pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = f();
    let peak = PEAK.load(Ordering::Relaxed);
    (result, peak.saturating_sub(before))
}

/// Whether [`CountingAlloc`] is the global allocator: a target that asserts a bound must fail
/// rather than pass vacuously when it is not.
pub fn is_counting() -> bool {
    let (_, peak) = peak_during(|| std::hint::black_box(vec![0u8; 4096]));
    peak >= 4096
}
