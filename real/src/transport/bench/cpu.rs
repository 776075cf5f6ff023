//! CPU time of the calling thread or the whole process, from `getrusage`.

use std::time::Duration;

/// `RUSAGE_THREAD` (linux/resource.h); the `libc` crate lacks it for glibc targets.
const RUSAGE_THREAD: libc::c_int = 1;

/// User and system CPU time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct CpuTime {
    pub(crate) user: Duration,
    pub(crate) system: Duration,
}

impl CpuTime {
    pub(crate) fn total(&self) -> Duration {
        self.user + self.system
    }

    /// `self - earlier`, per component.
    pub(crate) fn since(&self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

fn rusage(who: libc::c_int) -> CpuTime {
    // SAFETY: rusage is plain data that getrusage fills in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid `who` and a live out-pointer; getrusage cannot fail with these.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    CpuTime {
        user: tv(ru.ru_utime),
        system: tv(ru.ru_stime),
    }
}

/// CPU time of the calling thread.
pub(crate) fn thread() -> CpuTime {
    rusage(RUSAGE_THREAD)
}

/// CPU time of the whole process (all threads, including io_uring workers).
pub(crate) fn process() -> CpuTime {
    rusage(libc::RUSAGE_SELF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_thread_accumulates_cpu() {
        let before = thread();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let used = thread().since(before).total();
        assert!(used >= Duration::from_millis(5), "used {used:?}");
        assert!(process().total() >= used);
    }
}
