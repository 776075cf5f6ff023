//! Zero pages left out of a full capture (issue 12). A full checkpoint replaces the backup's
//! whole replica, which reads every page it does not list as zeroes; a guest that has touched
//! little of its RAM then sends only what it touched, as QEMU's live migration does.
//!
//! The rule that keeps it exact although the guest runs while RAM is scanned: a full capture
//! lists every page found non-zero by the scan, plus every page the dirty log says was written
//! since the scan began (those are sent whatever they hold: a page zeroed after the scan must
//! overwrite the replica's old contents as much as any other). The scan runs off the pause,
//! on the pre-copy's blocking thread; the pause only merges the few pages written since.
//!
//! Zero detection reads a page as 64-byte blocks of eight `u64` OR-ed together, which the
//! compiler turns into vector loads: it stops at the first non-zero block, so a page holding
//! data costs one cache line, a zero page one pass at memory speed.

/// Bytes per block compared at once.
const BLOCK: usize = 64;

/// Whether `bytes` are all zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(BLOCK);
    for b in &mut blocks {
        let acc = b.chunks_exact(8).fold(0u64, |acc, w| {
            // Always 8 bytes (`chunks_exact`); a failed conversion counts as non-zero.
            acc | w.try_into().map_or(u64::MAX, u64::from_ne_bytes)
        });
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Appends the indices of the non-zero pages of `ram` (pages of `page_size` bytes; a partial
/// last page counts as a page) to `indices`, in increasing order.
pub fn nonzero_pages(ram: &[u8], page_size: usize, indices: &mut Vec<u64>) {
    for (i, page) in ram.chunks(page_size.max(1)).enumerate() {
        if !is_zero(page) {
            indices.push(i as u64);
        }
    }
}

/// Copies the non-zero pages of `ram` to the end of `data`, their indices to `indices` (in
/// increasing order): the pre-copy of a full capture.
pub fn copy_nonzero_pages(
    ram: &[u8],
    page_size: usize,
    indices: &mut Vec<u64>,
    data: &mut Vec<u8>,
) {
    for (i, page) in ram.chunks(page_size.max(1)).enumerate() {
        if !is_zero(page) {
            indices.push(i as u64);
            data.extend_from_slice(page);
        }
    }
}

/// The pages of `a` and `b`, each increasing, in increasing order, once each.
pub fn union_sorted(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while let (Some(&x), Some(&y)) = (a.get(i), b.get(j)) {
        out.push(x.min(y));
        i += usize::from(x <= y);
        j += usize::from(y <= x);
    }
    out.extend_from_slice(a.get(i..).unwrap_or_default());
    out.extend_from_slice(b.get(j..).unwrap_or_default());
    out
}

/// A pre-copied full capture (`indices` increasing, `data` their pages) brought up to date in
/// the pause: each page of `written` (the dirty log since the copy began) is copied again from
/// `page` into its slot, or appended when the copy found it zero. Returns how many were
/// appended. A page `page` cannot give (outside RAM) is left out: the caller checked them.
pub fn merge_written<'a>(
    indices: &mut Vec<u64>,
    data: &mut Vec<u8>,
    page_size: usize,
    written: &[u64],
    page: impl Fn(u64) -> Option<&'a [u8]>,
) -> usize {
    let mut written = written.to_vec();
    written.sort_unstable();
    written.dedup();
    let copied = indices.len();
    let mut appended = 0;
    for p in written {
        let Some(src) = page(p).filter(|s| s.len() == page_size) else {
            continue;
        };
        let slot = indices
            .get(..copied)
            .and_then(|sorted| sorted.binary_search(&p).ok())
            .and_then(|i| data.get_mut(i * page_size..(i + 1) * page_size));
        match slot {
            Some(dst) => dst.copy_from_slice(src),
            None => {
                indices.push(p);
                data.extend_from_slice(src);
                appended += 1;
            }
        }
    }
    appended
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 4096;

    fn ram(pages: &[(usize, u8)], count: usize) -> Vec<u8> {
        let mut r = vec![0u8; count * PS];
        for &(p, v) in pages {
            r[p * PS..(p + 1) * PS].fill(v);
        }
        r
    }

    #[test]
    fn a_single_set_byte_anywhere_makes_a_page_non_zero() {
        assert!(is_zero(&[0; PS]));
        assert!(is_zero(&[]));
        for at in [0, 7, 8, 63, 64, 100, PS - 1] {
            let mut p = vec![0u8; PS];
            p[at] = 1;
            assert!(!is_zero(&p), "byte {at}");
        }
        // Lengths that are not a multiple of the block: the remainder is checked too.
        let mut odd = vec![0u8; 70];
        assert!(is_zero(&odd));
        odd[69] = 0x80;
        assert!(!is_zero(&odd));
    }

    #[test]
    fn only_non_zero_pages_are_listed_and_copied() {
        let r = ram(&[(1, 3), (4, 9), (5, 1)], 8);
        let mut idx = vec![];
        nonzero_pages(&r, PS, &mut idx);
        assert_eq!(idx, vec![1, 4, 5]);
        let (mut idx, mut data) = (vec![], vec![]);
        copy_nonzero_pages(&r, PS, &mut idx, &mut data);
        assert_eq!(idx, vec![1, 4, 5]);
        assert_eq!(data.len(), 3 * PS);
        assert_eq!(&data[PS..2 * PS], &vec![9u8; PS][..]);
        // A page with one byte set at its very end is not zero.
        let mut r = vec![0u8; 2 * PS];
        r[2 * PS - 1] = 1;
        let mut idx = vec![];
        nonzero_pages(&r, PS, &mut idx);
        assert_eq!(idx, vec![1]);
    }

    #[test]
    fn union_keeps_order_and_drops_duplicates() {
        assert_eq!(
            union_sorted(&[1, 4, 9], &[0, 4, 5, 10]),
            vec![0, 1, 4, 5, 9, 10]
        );
        assert_eq!(union_sorted(&[], &[2, 3]), vec![2, 3]);
        assert_eq!(union_sorted(&[2, 3], &[]), vec![2, 3]);
        assert_eq!(union_sorted(&[u64::MAX], &[u64::MAX]), vec![u64::MAX]);
    }

    #[test]
    fn pages_written_since_the_copy_are_recopied_or_appended_even_when_zero() {
        // Copied ahead: pages 1 and 4 held data, the rest were zero.
        let before = ram(&[(1, 3), (4, 9)], 8);
        let (mut idx, mut data) = (vec![], vec![]);
        copy_nonzero_pages(&before, PS, &mut idx, &mut data);
        // Meanwhile the guest zeroed page 1, wrote page 6 and wrote page 2 back to zero.
        let now = ram(&[(4, 9), (6, 7)], 8);
        let page = |p: u64| now.get(p as usize * PS..(p as usize + 1) * PS);
        let appended = merge_written(&mut idx, &mut data, PS, &[6, 1, 2, 6, 99], page);
        assert_eq!(appended, 2, "pages 2 and 6 were not copied ahead");
        assert_eq!(idx, vec![1, 4, 2, 6], "page 99 is outside RAM: left out");
        assert_eq!(&data[..PS], &vec![0u8; PS][..], "page 1 is sent zeroed");
        assert_eq!(&data[PS..2 * PS], &vec![9u8; PS][..]);
        assert_eq!(
            &data[2 * PS..3 * PS],
            &vec![0u8; PS][..],
            "page 2 sent, zero"
        );
        assert_eq!(&data[3 * PS..], &vec![7u8; PS][..]);
    }
}
