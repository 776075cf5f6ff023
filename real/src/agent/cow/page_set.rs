//! A set of guest page indices as a bitmap: the copy-on-write engine keeps four (the pages
//! written since the last capture, those the fault handler left writable, those an early pass
//! protected this epoch, and the hot ones among them that were written again).

/// A set of page indices below a fixed bound.
#[derive(Debug, Clone)]
pub(super) struct PageSet {
    words: Vec<u64>,
    len: u64,
    bound: u64,
}

impl PageSet {
    /// An empty set of pages below `pages`.
    pub(super) fn new(pages: u64) -> PageSet {
        PageSet {
            words: vec![0; pages.div_ceil(64) as usize],
            len: 0,
            bound: pages,
        }
    }

    /// Adds `page` (ignored when out of range).
    pub(super) fn insert(&mut self, page: u64) {
        if page >= self.bound {
            return;
        }
        if let Some(w) = self.words.get_mut((page / 64) as usize) {
            let bit = 1 << (page % 64);
            if *w & bit == 0 {
                *w |= bit;
                self.len += 1;
            }
        }
    }

    /// Whether `page` is in the set.
    pub(super) fn contains(&self, page: u64) -> bool {
        page < self.bound
            && self
                .words
                .get((page / 64) as usize)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Empties the set.
    pub(super) fn clear(&mut self) {
        if self.len > 0 {
            self.words.fill(0);
            self.len = 0;
        }
    }

    /// Adds every page of `pages`.
    pub(super) fn extend(&mut self, pages: &[u64]) {
        for &p in pages {
            self.insert(p);
        }
    }

    /// Number of pages in the set.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Empties the set, returning its pages in ascending order.
    pub(super) fn take(&mut self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.len as usize);
        if self.len > 0 {
            for (i, w) in self.words.iter_mut().enumerate() {
                let mut bits = std::mem::take(w);
                while bits != 0 {
                    out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                    bits &= bits - 1;
                }
            }
        }
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::PageSet;

    #[test]
    fn holds_each_page_once_and_gives_them_back_in_order() {
        let mut s = PageSet::new(200);
        for p in [130, 3, 64, 3, 199, 0, 63] {
            s.insert(p);
        }
        s.insert(200); // out of range
        assert_eq!(s.len(), 6);
        assert!(s.contains(63) && s.contains(199) && !s.contains(62) && !s.contains(200));
        assert_eq!(s.take(), vec![0, 3, 63, 64, 130, 199]);
        assert_eq!(s.len(), 0);
        assert!(s.take().is_empty());
        s.extend(&[5, 6, 5]);
        assert_eq!(s.len(), 2);
        assert_eq!(s.take(), vec![5, 6]);
        s.extend(&[1, 2]);
        s.clear();
        assert!(!s.contains(1));
        assert!(s.take().is_empty());
    }
}
