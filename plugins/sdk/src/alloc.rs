//! A small-block allocator for plugins built to wasm32: freed blocks of up to 128 bytes
//! are kept on per-size free lists and handed out again, in front of the system's.
//!
//! Why: a batch of decisions allocates and frees a handful of short strings per event,
//! and wasi-libc's general-purpose malloc costs far more per call inside the sandbox
//! than a list pop. Measured on the default rules: about 17% of a batched decision
//! (BENCHMARKS.md). Blocks on the lists are not given back to the system allocator, so
//! memory stays at the peak of small blocks in use, well inside the sandbox's cap.
//!
//! It is on by default (the `small-block-alloc` feature). A plugin that brings its own
//! `#[global_allocator]` turns the SDK's default features off.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;

/// Size classes: 16, 32, 64 and 128 bytes, for alignments up to 8 (all of wasm32's
/// scalars; asking the system for more goes through its slower aligned path).
const CLASSES: usize = 4;
const SMALLEST: usize = 16;
const ALIGN: usize = 8;

/// The head of each class's free list; a free block holds the next block's address.
struct FreeLists(UnsafeCell<[*mut u8; CLASSES]>);

// A wasm32 component runs on one thread (this module is built only without the
// `atomics` target feature), so the lists are never touched concurrently.
unsafe impl Sync for FreeLists {}

static LISTS: FreeLists = FreeLists(UnsafeCell::new([std::ptr::null_mut(); CLASSES]));

pub struct SmallBlocks;

fn class(layout: &Layout) -> Option<usize> {
    if layout.align() > ALIGN {
        return None;
    }
    (0..CLASSES).find(|c| layout.size() <= SMALLEST << c)
}

unsafe impl GlobalAlloc for SmallBlocks {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class(&layout) else { return unsafe { System.alloc(layout) } };
        // SAFETY: one thread (see above); a listed block is free and at least a pointer long.
        unsafe {
            let lists = &mut *LISTS.0.get();
            let head = lists[c];
            if head.is_null() {
                System.alloc(Layout::from_size_align_unchecked(SMALLEST << c, ALIGN))
            } else {
                lists[c] = *head.cast::<*mut u8>();
                head
            }
        }
    }

    /// Growing within a class keeps the block; growing a large block is the system's.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller gives a valid layout and a non-zero size that fits it.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class(&layout), class(&new)) {
            (Some(a), Some(b)) if a == b => ptr,
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            _ => unsafe {
                let moved = self.alloc(new);
                if !moved.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                moved
            },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // The same layout as at allocation, so the same class: the block is that big.
        let Some(c) = class(&layout) else { return unsafe { System.dealloc(ptr, layout) } };
        // SAFETY: one thread; the block is ours again, 8-byte aligned and at least 16 long.
        unsafe {
            let lists = &mut *LISTS.0.get();
            *ptr.cast::<*mut u8>() = lists[c];
            lists[c] = ptr;
        }
    }
}
