//! The `mmap` this library shadows: found with `dlsym(RTLD_NEXT, …)` on first use, with a raw
//! `mmap` system call as the fallback when the lookup fails or re-enters (dlsym may allocate,
//! and an allocator may map memory).

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// C signature shared by `mmap` and `mmap64` on 64-bit glibc.
pub type MmapFn = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, i64) -> *mut c_void;

/// One lazily resolved symbol.
pub struct NextSymbol {
    name: &'static CStr,
    addr: AtomicUsize,
    resolving: AtomicBool,
}

impl NextSymbol {
    /// A symbol resolved on first call.
    pub const fn new(name: &'static CStr) -> Self {
        NextSymbol {
            name,
            addr: AtomicUsize::new(0),
            resolving: AtomicBool::new(false),
        }
    }

    /// The next definition of the symbol, or `None` while it cannot be resolved.
    fn get(&self) -> Option<MmapFn> {
        let mut a = self.addr.load(Ordering::Acquire);
        if a == 0 {
            if self.resolving.swap(true, Ordering::AcqRel) {
                return None; // re-entered from inside dlsym: use the system call
            }
            // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name has no preconditions; it
            // returns null or the address of the next `mmap` definition after this library.
            a = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) } as usize;
            self.addr.store(a, Ordering::Release);
            self.resolving.store(false, Ordering::Release);
            if a == 0 {
                return None;
            }
        }
        // SAFETY: `a` is non-null and came from dlsym for a function with exactly this C
        // signature (glibc's mmap/mmap64 on a 64-bit target).
        Some(unsafe { std::mem::transmute::<usize, MmapFn>(a) })
    }

    /// Calls the next definition (or the system call) with the caller's arguments unchanged.
    ///
    /// # Safety
    /// Same contract as mmap(2): the caller owns the consequences of mapping over `addr`.
    pub unsafe fn call(
        &self,
        addr: *mut c_void,
        len: usize,
        prot: c_int,
        flags: c_int,
        fd: c_int,
        off: i64,
    ) -> *mut c_void {
        match self.get() {
            // SAFETY: forwarded verbatim under the caller's mmap contract.
            Some(f) => unsafe { f(addr, len, prot, flags, fd, off) },
            // SAFETY: the raw system call has the same contract; glibc's syscall() returns -1 and
            // sets errno on failure, which is exactly MAP_FAILED + errno.
            None => unsafe {
                libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void
            },
        }
    }
}
