//! The segments of one send, as raw iovecs: adjacent segments coalesced, cut into windows of at
//! most `IOV_MAX` iovecs and a byte budget per syscall, advanced past short sends.

use std::io::IoSlice;

/// Most iovecs one `sendmsg` takes (Linux `UIO_MAXIOV`); more fails with EMSGSIZE.
pub(crate) const IOV_MAX: usize = libc::UIO_MAXIOV as usize;

/// A list of iovecs pointing into caller memory.
///
/// Holds raw pointers only to pass them to the kernel; it never dereferences them.
pub(crate) struct IovBuf(pub(crate) Vec<libc::iovec>);

// SAFETY: the pointers are addresses handed to syscalls, never dereferenced by this process; the
// caller of `Transport::send` vouches for the memory whatever thread the transport runs on.
unsafe impl Send for IovBuf {}

impl IovBuf {
    pub(crate) fn new() -> Self {
        IovBuf(Vec::new())
    }
}

/// The unsent rest of one send's segments.
pub(crate) struct IovQueue {
    iov: IovBuf,
    /// First iovec not fully sent.
    idx: usize,
    /// Bytes of `iov[idx]` already sent.
    off: usize,
    remaining: usize,
}

impl IovQueue {
    pub(crate) fn new() -> Self {
        IovQueue {
            iov: IovBuf::new(),
            idx: 0,
            off: 0,
            remaining: 0,
        }
    }

    /// Replaces the queue's contents with `segs`, dropping empty segments and merging a segment
    /// that starts where the previous one ends.
    pub(crate) fn load(&mut self, segs: &[IoSlice<'_>]) {
        let v = &mut self.iov.0;
        v.clear();
        self.idx = 0;
        self.off = 0;
        self.remaining = 0;
        for s in segs.iter().filter(|s| !s.is_empty()) {
            let base = s.as_ptr() as usize;
            self.remaining += s.len();
            if let Some(last) = v.last_mut() {
                if last.iov_base as usize + last.iov_len == base {
                    last.iov_len += s.len();
                    continue;
                }
            }
            v.push(libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: s.len(),
            });
        }
    }

    /// Bytes not yet sent.
    pub(crate) fn remaining(&self) -> usize {
        self.remaining
    }

    /// Iovecs left (after coalescing), counting a partly sent one.
    #[cfg(test)]
    pub(crate) fn iovecs_left(&self) -> usize {
        self.iov.0.len() - self.idx
    }

    /// Fills `out` with the next window (≤ `max_iov` iovecs, ≤ `max_bytes` bytes, never empty
    /// unless the queue is) and returns its byte count.
    pub(crate) fn window(&self, out: &mut IovBuf, max_iov: usize, max_bytes: usize) -> usize {
        out.0.clear();
        let mut bytes = 0;
        for (i, iov) in self.iov.0[self.idx..].iter().enumerate() {
            if out.0.len() == max_iov.max(1) || bytes == max_bytes {
                break;
            }
            let skip = if i == 0 { self.off } else { 0 };
            let len = (iov.iov_len - skip).min(max_bytes - bytes);
            out.0.push(libc::iovec {
                iov_base: (iov.iov_base as usize + skip) as *mut libc::c_void,
                iov_len: len,
            });
            bytes += len;
        }
        bytes
    }

    /// Marks the first `n` bytes as sent.
    pub(crate) fn advance(&mut self, mut n: usize) {
        debug_assert!(n <= self.remaining);
        n = n.min(self.remaining);
        self.remaining -= n;
        while n > 0 {
            let left = self.iov.0[self.idx].iov_len - self.off;
            if n < left {
                self.off += n;
                return;
            }
            n -= left;
            self.idx += 1;
            self.off = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects the bytes a window points at.
    fn bytes_of(w: &IovBuf) -> Vec<u8> {
        let mut out = Vec::new();
        for iov in &w.0 {
            // SAFETY: the test's windows point into `data`, alive for the whole test.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len)
            });
        }
        out
    }

    #[test]
    fn coalesces_adjacent_and_drops_empty() {
        let data: Vec<u8> = (0..100u8).collect();
        let segs = [
            IoSlice::new(&data[0..10]),
            IoSlice::new(&data[10..10]),
            IoSlice::new(&data[10..30]),
            IoSlice::new(&data[50..60]),
            IoSlice::new(&data[30..40]),
        ];
        let mut q = IovQueue::new();
        q.load(&segs);
        assert_eq!(q.remaining(), 50);
        assert_eq!(q.iovecs_left(), 3);
        let mut w = IovBuf::new();
        assert_eq!(q.window(&mut w, 8, 1000), 50);
        let mut want = data[0..30].to_vec();
        want.extend_from_slice(&data[50..60]);
        want.extend_from_slice(&data[30..40]);
        assert_eq!(bytes_of(&w), want);
    }

    #[test]
    fn windows_and_short_sends_replay_every_byte_once() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        // Non-adjacent segments of odd lengths, in a scrambled order.
        let mut segs = Vec::new();
        let mut want = Vec::new();
        for k in 0..60usize {
            let start = (k * 37) % 4000;
            let len = 1 + (k * 13) % 50;
            segs.push(IoSlice::new(&data[start..start + len]));
            want.extend_from_slice(&data[start..start + len]);
            // A gap so nothing coalesces by accident... unless the layout makes it adjacent,
            // which is fine: the bytes must come out the same either way.
        }
        let mut q = IovQueue::new();
        q.load(&segs);
        let mut got = Vec::new();
        let mut w = IovBuf::new();
        let mut step = 0usize;
        while q.remaining() > 0 {
            let n = q.window(&mut w, 5, 97);
            assert!(n > 0 && n <= 97 && w.0.len() <= 5);
            // Pretend the kernel took a varying prefix: sometimes all, sometimes a few bytes.
            let took = match step % 3 {
                0 => n,
                1 => 1,
                _ => n / 2 + 1,
            }
            .min(n);
            got.extend_from_slice(&bytes_of(&w)[..took]);
            q.advance(took);
            step += 1;
        }
        assert_eq!(got, want);
    }

    #[test]
    fn window_respects_iov_max() {
        let data = vec![0u8; 3 * IOV_MAX * 2];
        // Every other byte: nothing is adjacent.
        let segs: Vec<IoSlice<'_>> = (0..3 * IOV_MAX)
            .map(|i| IoSlice::new(&data[2 * i..2 * i + 1]))
            .collect();
        let mut q = IovQueue::new();
        q.load(&segs);
        let mut w = IovBuf::new();
        assert_eq!(q.window(&mut w, IOV_MAX, usize::MAX), IOV_MAX);
        assert_eq!(w.0.len(), IOV_MAX);
    }
}
