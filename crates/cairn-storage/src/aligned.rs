//! A growable, page-aligned byte buffer for O_DIRECT I/O.

use std::alloc::{alloc_zeroed, dealloc, Layout};

pub struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
    align: usize,
}

// The buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(align: usize) -> AlignedBuf {
        AlignedBuf { ptr: std::ptr::null_mut(), cap: 0, align }
    }

    /// A slice of exactly `len` bytes (a multiple of the alignment), reusing the allocation
    /// when it is large enough. Contents are unspecified.
    pub fn prepare(&mut self, len: usize) -> &mut [u8] {
        assert!(len.is_multiple_of(self.align));
        if len > self.cap {
            self.free();
            let cap = len.next_power_of_two().max(self.align);
            let layout = Layout::from_size_align(cap, self.align).unwrap();
            let ptr = unsafe { alloc_zeroed(layout) };
            assert!(!ptr.is_null(), "out of memory allocating {cap} bytes");
            self.ptr = ptr;
            self.cap = cap;
        }
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            unsafe { dealloc(self.ptr, Layout::from_size_align(self.cap, self.align).unwrap()) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn aligned_and_reused() {
        let mut b = super::AlignedBuf::new(4096);
        let p1 = b.prepare(8192).as_ptr() as usize;
        assert_eq!(p1 % 4096, 0);
        b.prepare(4096)[0] = 1;
        assert_eq!(b.prepare(4096).as_ptr() as usize, p1);
        assert_eq!(b.prepare(1 << 20).len(), 1 << 20);
    }
}
