//! When `auto` gives up zero-copy: the kernel reports, per call, whether it copied anyway. On
//! loopback and veth it always does (the receive path copies the pages); with a real NIC it
//! does not, unless something like a packet socket (tcpdump) taps the traffic.

/// Calls judged before the first decision: small, so a copying path costs only a few slow calls.
const FIRST_WINDOW: u64 = 4;
/// Calls per later check, so a path that starts copying (e.g. tcpdump attached) is noticed.
const LATER_WINDOW: u64 = 256;

/// Watches completions and says when to fall back.
#[derive(Debug)]
pub(crate) struct FallbackPolicy {
    window: u64,
    zerocopy: u64,
    copied: u64,
}

impl FallbackPolicy {
    pub(crate) fn new() -> Self {
        FallbackPolicy {
            window: FIRST_WINDOW,
            zerocopy: 0,
            copied: 0,
        }
    }

    /// Records completed calls; returns why to fall back once a window of calls was mostly
    /// copied by the kernel.
    pub(crate) fn observe(&mut self, zerocopy: u64, copied: u64) -> Option<String> {
        self.zerocopy += zerocopy;
        self.copied += copied;
        let total = self.zerocopy + self.copied;
        if total < self.window {
            return None;
        }
        let verdict = (self.copied * 2 > total).then(|| {
            format!(
                "the kernel copied {} of the last {} zero-copy sends (typical of loopback, veth, \
                 or a device without scatter-gather), so zero-copy only adds completion overhead",
                self.copied, total
            )
        });
        self.window = LATER_WINDOW;
        self.zerocopy = 0;
        self.copied = 0;
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_back_when_mostly_copied() {
        let mut p = FallbackPolicy::new();
        assert_eq!(p.observe(0, 3), None);
        assert!(p.observe(0, 1).is_some());
    }

    #[test]
    fn stays_when_zero_copy_works_and_rechecks_later() {
        let mut p = FallbackPolicy::new();
        assert_eq!(p.observe(4, 0), None);
        // Occasional copies within the next window do not trigger a fallback...
        assert_eq!(p.observe(200, 56), None);
        // ...but a window that is mostly copied does.
        assert_eq!(p.observe(100, 100), None);
        assert!(p.observe(0, 100).is_some());
    }
}
