//! A set of page indices (relative to the start of the RAM file), kept as sorted, disjoint,
//! non-adjacent ranges — the shape PAGEMAP_SCAN returns and transports batch into iovecs.

use std::ops::Range;

/// Pages written since the previous scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    ranges: Vec<Range<u64>>,
    count: u64,
}

impl DirtyPages {
    /// No pages.
    pub fn new() -> DirtyPages {
        DirtyPages::default()
    }

    /// Every page of a RAM of `pages` pages.
    pub fn all(pages: u64) -> DirtyPages {
        let mut d = DirtyPages::new();
        d.push(0..pages);
        d
    }

    /// The set of the given ranges, in any order, overlapping or not.
    pub fn from_ranges(ranges: impl IntoIterator<Item = Range<u64>>) -> DirtyPages {
        let mut v: Vec<Range<u64>> = ranges.into_iter().filter(|r| r.start < r.end).collect();
        v.sort_unstable_by_key(|r| r.start);
        let mut d = DirtyPages::new();
        for r in v {
            d.push(r);
        }
        d
    }

    /// The set of the given page indices, in any order, duplicates allowed.
    pub fn from_indices(indices: impl IntoIterator<Item = u64>) -> DirtyPages {
        DirtyPages::from_ranges(indices.into_iter().map(|p| p..p + 1))
    }

    /// Appends a range that starts at or after the start of the last one (merging overlaps and
    /// neighbours). Out-of-order ranges go through [`DirtyPages::from_ranges`] instead.
    pub(crate) fn push(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        if let Some(last) = self.ranges.last_mut() {
            debug_assert!(r.start >= last.start, "DirtyPages::push out of order");
            if r.start <= last.end {
                if r.end > last.end {
                    self.count += r.end - last.end;
                    last.end = r.end;
                }
                return;
            }
        }
        self.count += r.end - r.start;
        self.ranges.push(r);
    }

    /// Sorted, disjoint, non-adjacent ranges of page indices.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Number of pages.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// No pages at all.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether page `index` is in the set.
    pub fn contains(&self, index: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= index);
        self.ranges.get(i).is_some_and(|r| r.start <= index)
    }

    /// The page indices in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|r| r.clone())
    }

    /// The page indices in ascending order, as a vector.
    pub fn to_indices(&self) -> Vec<u64> {
        let mut v = Vec::with_capacity(self.count as usize);
        v.extend(self.iter());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_merged_sorted_and_counted() {
        let d = DirtyPages::from_ranges([7..9, 0..2, 1..3, 3..4, 20..20, 8..12]);
        assert_eq!(d.ranges(), &[0..4, 7..12]);
        assert_eq!(d.count(), 9);
        assert_eq!(d.to_indices(), vec![0, 1, 2, 3, 7, 8, 9, 10, 11]);
        for p in 0..14 {
            assert_eq!(
                d.contains(p),
                (0..4).contains(&p) || (7..12).contains(&p),
                "page {p}"
            );
        }
    }

    #[test]
    fn indices_dedupe_and_empty_is_empty() {
        let d = DirtyPages::from_indices([5, 3, 5, 4, 9]);
        assert_eq!(d.ranges(), &[3..6, 9..10]);
        assert_eq!(d.count(), 4);
        assert!(DirtyPages::from_indices([]).is_empty());
        assert_eq!(DirtyPages::all(3).to_indices(), vec![0, 1, 2]);
    }
}
