//! TEST HELPER (not part of ftvm): stands in for QEMU in the dirty-tracking tests. It maps a RAM
//! file the way QEMU does — reserve the range with an anonymous PROT_NONE mapping, then map the
//! file over it with `MAP_FIXED | MAP_SHARED` through `mmap64` (or `mmap`) — so that the preload
//! library, loaded with LD_PRELOAD, tracks it. It then writes pages on command.
//!
//! Usage: `ftvm-dirty-test-child <ram-file> <bytes> <mmap64|mmap>`. Prints `ready <address>`,
//! then reads commands from stdin, one per line, answering `ok` to each:
//! - `write <tag> <page>...`: stores 8 bytes derived from `tag` and the page into each page
//!   (the content changes when the tag does);
//! - `same <page>...`: rewrites one byte of each page with the value it already holds;
//! - `read <page>...`: only reads the pages;
//! - `quit`.

use std::ffi::CString;
use std::io::{BufRead, Write};

fn fail(msg: String) -> ! {
    eprintln!("ftvm-dirty-test-child: {msg}");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        fail("usage: ftvm-dirty-test-child <ram-file> <bytes> <mmap64|mmap>".into());
    }
    let bytes: usize = args[2]
        .parse()
        .unwrap_or_else(|e| fail(format!("bytes: {e}")));
    let base = map_like_qemu(&args[1], bytes, &args[3]);
    // SAFETY: sysconf has no preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let pages = bytes / ps;
    println!("ready {:#x}", base as usize);

    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line.unwrap_or_else(|e| fail(format!("stdin: {e}")));
        let mut words = line.split_ascii_whitespace();
        let cmd = words.next().unwrap_or("");
        if cmd == "quit" {
            break;
        }
        let mut nums = words.map(|w| {
            w.parse::<u64>()
                .unwrap_or_else(|e| fail(format!("{w}: {e}")))
        });
        let tag = if cmd == "write" {
            nums.next().unwrap_or(0)
        } else {
            0
        };
        let mut sum = 0u64;
        for p in nums {
            if p as usize >= pages {
                fail(format!("page {p} out of range"));
            }
            let off = p as usize * ps + (p as usize * 40) % (ps - 8);
            // SAFETY: `off..off+8` lies inside page `p` of the live `bytes`-long mapping.
            unsafe {
                let at = base.add(off);
                match cmd {
                    "write" => at
                        .cast::<u64>()
                        .write_unaligned(tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ p ^ 1),
                    "same" => std::ptr::write_volatile(at, std::ptr::read_volatile(at)),
                    "read" => sum = sum.wrapping_add(std::ptr::read_volatile(at) as u64),
                    _ => fail(format!("unknown command {cmd:?}")),
                }
            }
        }
        std::hint::black_box(sum);
        writeln!(out, "ok")
            .and_then(|_| out.flush())
            .unwrap_or_else(|e| fail(format!("stdout: {e}")));
    }
}

/// Reserve, then map the file over the reservation with MAP_FIXED, like QEMU's qemu_ram_mmap.
fn map_like_qemu(path: &str, bytes: usize, via: &str) -> *mut u8 {
    let cpath = CString::new(path).unwrap_or_else(|e| fail(format!("path: {e}")));
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_RDWR) };
    if fd < 0 {
        fail(format!("open {path}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh anonymous PROT_NONE reservation at a kernel-chosen address.
    let reserved = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if reserved == libc::MAP_FAILED {
        fail(format!("reserve: {}", std::io::Error::last_os_error()));
    }
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_FIXED | libc::MAP_SHARED;
    // SAFETY: MAP_FIXED over the reservation this function just made and owns.
    let p = unsafe {
        match via {
            "mmap64" => libc::mmap64(reserved, bytes, prot, flags, fd, 0),
            "mmap" => libc::mmap(reserved, bytes, prot, flags, fd, 0),
            o => fail(format!("unknown mapping call {o:?}")),
        }
    };
    if p != reserved {
        fail(format!("map file: {}", std::io::Error::last_os_error()));
    }
    p.cast()
}
