//! The spare staging buffer: which of two buffers to keep when one comes back.
//!
//! A buffer's pages stay faulted in as long as it lives (`Vec::clear` keeps them), and a full
//! sync's pre-copy fills the spare with every non-zero page of RAM (issue 12). Keeping the
//! buffer last handed back instead of the larger one let an ordinary epoch's small buffer
//! replace the warm RAM-sized one: the next sync's pre-copy then grew a fresh buffer by
//! reallocation and faulted each of its pages in again, on a 2-core host that also runs the
//! guest, the sender and (in the benchmark) the backup. The larger one is kept, the other
//! dropped.

use crate::replica::StagedCheckpoint;

/// Puts `buf` into `spare` unless the buffer already there holds at least as much.
pub(super) fn keep_larger(spare: &mut Option<StagedCheckpoint>, buf: StagedCheckpoint) {
    match spare {
        Some(s) if s.data.capacity() >= buf.data.capacity() => {}
        _ => *spare = Some(buf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_capacity(bytes: usize) -> StagedCheckpoint {
        let mut s = StagedCheckpoint::default();
        s.data.reserve_exact(bytes);
        s
    }

    #[test]
    fn an_empty_spare_takes_any_buffer() {
        let mut spare = None;
        keep_larger(&mut spare, with_capacity(4096));
        assert!(spare.is_some_and(|s| s.data.capacity() >= 4096));
    }

    #[test]
    fn the_larger_buffer_stays() {
        let mut spare = Some(with_capacity(1 << 20));
        keep_larger(&mut spare, with_capacity(4096));
        assert!(spare.as_ref().is_some_and(|s| s.data.capacity() >= 1 << 20));
        keep_larger(&mut spare, with_capacity(4 << 20));
        assert!(spare.is_some_and(|s| s.data.capacity() >= 4 << 20));
    }
}
