//! The engine's preallocated, aligned buffer pool.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use super::{BlockError, BufId, Result, BUFFER_ALIGN};

/// Transparent huge page size on x86-64 and most arm64 kernels.
const HUGE_PAGE_BYTES: usize = 2 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    /// Acquired by the caller, who may read/write it.
    Owned,
    /// Part of a submitted operation: the kernel (or the plain engine) may access it.
    InFlight,
}

/// `count` buffers of `buffer_bytes` each, carved out of one zeroed allocation
/// aligned to [`BUFFER_ALIGN`] (to 2 MiB, backed by huge pages where the
/// kernel allows, when the pool is that large). Allocated once, freed on drop (unless leaked).
pub(crate) struct BufferPool {
    base: NonNull<u8>,
    layout: Layout,
    buffer_bytes: usize,
    state: Vec<State>,
    free: Vec<u32>,
    /// Set when the kernel may still access the memory: then it is never freed.
    leak: bool,
}

// SAFETY: the pool exclusively owns its allocation (like a `Vec<u8>`); the raw
// pointer is only dereferenced through `&self` (shared reads) or `&mut self`
// (exclusive writes), so moving it to another thread is sound.
unsafe impl Send for BufferPool {}
// SAFETY: `&self` methods only create shared slices of memory that no one mutates
// while the `&self` borrow lives (in-flight buffers are never exposed).
unsafe impl Sync for BufferPool {}

impl BufferPool {
    pub(crate) fn new(buffer_bytes: usize, count: usize) -> Result<BufferPool> {
        let total = buffer_bytes
            .checked_mul(count)
            .ok_or(BlockError::OutOfMemory { bytes: usize::MAX })?;
        if total == 0 || buffer_bytes % BUFFER_ALIGN != 0 || count > u32::MAX as usize {
            return Err(BlockError::InvalidConfig {
                reason: format!("buffer pool {count} x {buffer_bytes} bytes"),
            });
        }
        // Pools of a huge page or more are aligned to it and asked for
        // transparent huge pages (before the memory is first touched): a 1 MiB
        // buffer is then physically contiguous, one DMA segment, where 4 KiB
        // pages made a 1 MiB read exceed the disk's segment limit (254 on
        // this virtio disk) and split into several requests.
        let align = if total >= HUGE_PAGE_BYTES {
            HUGE_PAGE_BYTES
        } else {
            BUFFER_ALIGN
        };
        let layout = Layout::from_size_align(total, align)
            .map_err(|_| BlockError::OutOfMemory { bytes: total })?;
        // SAFETY: `layout` has a non-zero size (checked above).
        let ptr = unsafe { alloc::alloc(layout) };
        let base = NonNull::new(ptr).ok_or(BlockError::OutOfMemory { bytes: total })?;
        if align == HUGE_PAGE_BYTES {
            // SAFETY: the range is exactly our fresh allocation; MADV_HUGEPAGE
            // only changes how the kernel backs it (a failure is harmless).
            unsafe {
                libc::madvise(base.as_ptr().cast(), total, libc::MADV_HUGEPAGE);
            }
        }
        // SAFETY: `base` points to `total` writable bytes we own; zeroing
        // makes every buffer start initialised.
        unsafe { std::ptr::write_bytes(base.as_ptr(), 0, total) };
        Ok(BufferPool {
            base,
            layout,
            buffer_bytes,
            state: vec![State::Free; count],
            // Reversed so that acquire() hands out buffer 0 first.
            free: (0..count as u32).rev().collect(),
            leak: false,
        })
    }

    pub(crate) fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    pub(crate) fn count(&self) -> usize {
        self.state.len()
    }

    /// Start address of buffer `i` (no bounds check; callers pass valid indices).
    pub(crate) fn ptr(&self, i: u32) -> *mut u8 {
        // `wrapping_add` keeps this safe code; for valid `i` it stays inside the allocation.
        self.base
            .as_ptr()
            .wrapping_add(i as usize * self.buffer_bytes)
    }

    /// `iovec`s describing every buffer, for `io_uring_register_buffers`.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count() as u32)
            .map(|i| libc::iovec {
                iov_base: self.ptr(i).cast(),
                iov_len: self.buffer_bytes,
            })
            .collect()
    }

    fn state_of(&self, buf: BufId) -> Option<State> {
        self.state.get(buf.0 as usize).copied()
    }

    pub(crate) fn acquire(&mut self) -> Option<BufId> {
        let i = self.free.pop()?;
        self.state[i as usize] = State::Owned;
        Some(BufId(i))
    }

    pub(crate) fn release(&mut self, buf: BufId) {
        match self.state_of(buf) {
            Some(State::Owned) => {
                self.state[buf.0 as usize] = State::Free;
                self.free.push(buf.0);
            }
            Some(State::Free) => tracing::warn!(buf = buf.0, "release of a free buffer ignored"),
            Some(State::InFlight) => {
                tracing::warn!(buf = buf.0, "release of an in-flight buffer ignored")
            }
            None => tracing::warn!(buf = buf.0, "release of an unknown buffer ignored"),
        }
    }

    /// Mark a caller-owned buffer as in flight; error if it is not caller-owned.
    pub(crate) fn start_io(&mut self, buf: BufId) -> Result<()> {
        let reason = match self.state_of(buf) {
            Some(State::Owned) => {
                self.state[buf.0 as usize] = State::InFlight;
                return Ok(());
            }
            Some(State::Free) => "not acquired",
            Some(State::InFlight) => "already in flight",
            None => "no such buffer",
        };
        Err(BlockError::BadBuffer { id: buf.0, reason })
    }

    /// Hand an in-flight buffer back to the caller.
    pub(crate) fn end_io(&mut self, buf: BufId) {
        if let Some(s @ State::InFlight) = self.state.get_mut(buf.0 as usize) {
            *s = State::Owned;
        }
    }

    pub(crate) fn slice(&self, buf: BufId) -> Option<&[u8]> {
        if self.state_of(buf)? != State::Owned {
            return None;
        }
        // SAFETY: `buf` is a valid index, so the range lies inside our live, zero-
        // initialised allocation; the buffer is caller-owned (not in flight), so
        // nothing writes to it while the shared borrow of `self` lives.
        Some(unsafe { std::slice::from_raw_parts(self.ptr(buf.0), self.buffer_bytes) })
    }

    pub(crate) fn slice_mut(&mut self, buf: BufId) -> Option<&mut [u8]> {
        if self.state_of(buf)? != State::Owned {
            return None;
        }
        // SAFETY: as in `slice`, plus `&mut self` guarantees no other slice of the
        // pool is alive, and buffers do not overlap.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr(buf.0), self.buffer_bytes) })
    }

    /// Never free the memory (the kernel might still write into it).
    pub(crate) fn leak(&mut self) {
        self.leak = true;
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        if self.leak {
            tracing::error!(
                bytes = self.layout.size(),
                "leaking I/O buffers: the kernel may still access them"
            );
            return;
        }
        // SAFETY: `base` was returned by `alloc_zeroed(self.layout)` and is freed once.
        // Engines that let the kernel access the memory either wait for all such
        // accesses to finish before the pool drops, or call `leak()`.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_pools_are_huge_page_aligned_and_zeroed() {
        let mut p = BufferPool::new(1 << 20, 4).unwrap();
        assert_eq!(p.ptr(0) as usize % HUGE_PAGE_BYTES, 0, "2 MiB-aligned");
        let b = p.acquire().unwrap();
        // SAFETY: buffer `b` is owned by this test and `buffer_bytes` long.
        let bytes = unsafe { std::slice::from_raw_parts(p.ptr(b.0), p.buffer_bytes()) };
        assert!(bytes.iter().all(|&x| x == 0), "zeroed");
        p.release(b);
        let small = BufferPool::new(4096, 4).unwrap();
        assert_eq!(small.ptr(0) as usize % BUFFER_ALIGN, 0);
    }
}
