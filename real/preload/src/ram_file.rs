//! Recognising the guest RAM file among the files QEMU maps: `FTVM_RAM_FILE` names it; a mapping
//! matches when `/proc/self/fd/N` resolves to the same path, or (robust to symlinks and renames)
//! when the fd and the named file are the same inode.

use std::ffi::{c_int, CStr, CString};

/// Environment variable naming the RAM file.
pub const RAM_FILE_ENV: &CStr = c"FTVM_RAM_FILE";

/// Reads an environment variable without allocating through Rust's env lock (safe to call from
/// inside an interposed libc function).
pub fn env(name: &CStr) -> Option<CString> {
    // SAFETY: getenv takes a NUL-terminated name and returns null or a pointer into environ,
    // copied out at once (nobody in QEMU calls setenv concurrently with a RAM mapping).
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null getenv results are NUL-terminated strings.
    let v = unsafe { CStr::from_ptr(p) };
    if v.is_empty() {
        None
    } else {
        Some(v.to_owned())
    }
}

/// What `/proc/self/fd/<fd>` points at (for the log and the path match).
pub fn fd_path(fd: c_int) -> Option<Vec<u8>> {
    let link = CString::new(format!("/proc/self/fd/{fd}")).ok()?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: `link` is NUL-terminated; readlink writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::readlink(link.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

fn same_inode(fd: c_int, path: &CStr) -> bool {
    // SAFETY: stat structs are plain data; zeroed is a valid initial value.
    let (mut a, mut b): (libc::stat, libc::stat) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: fstat/stat write into the live structs above; `path` is NUL-terminated.
    let ok = unsafe { libc::fstat(fd, &mut a) == 0 && libc::stat(path.as_ptr(), &mut b) == 0 };
    ok && a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

/// Whether `fd` is the RAM file named by `want`.
pub fn is_ram_file(fd: c_int, want: &CStr) -> bool {
    if fd_path(fd).as_deref() == Some(want.to_bytes()) {
        return true;
    }
    same_inode(fd, want)
}
