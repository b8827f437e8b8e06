//! Operating-system scheduling hints for the aggregator's own threads.
//!
//! The KEDA scaler thread answers a few small calls per second while the ingest thread may run
//! flat out on the same core. Under Linux's EEVDF scheduler a thread that wakes up on a busy core
//! may wait for the running thread's whole time slice, and the slice is only enforced at the next
//! timer tick (4 ms at HZ=250): that wait, not the work, made up the scaler's latency tail. A
//! thread that asks for a short slice (Linux 6.12+, `sched_setattr` with `sched_runtime` on a
//! normal-policy thread, no privilege needed) preempts a longer-sliced thread when it wakes, while
//! its share of the CPU stays what its nice value says.
//!
//! This module only ever changes the calling thread; it never raises priority, never changes the
//! scheduling policy and never needs a capability. On kernels that lack the feature nothing
//! happens.

use std::time::Duration;

/// What became of a request for a shorter slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceOutcome {
    /// The kernel now uses this slice for the thread.
    Applied(Duration),
    /// The kernel accepted the call but kept its own slice (before Linux 6.12).
    Unsupported,
}

/// Asks the kernel to give the calling thread a time slice of `slice` (the kernel clamps it to
/// 0.1–100 ms). Keeps the thread's policy and nice value.
#[cfg(target_os = "linux")]
pub fn request_short_slice(slice: Duration) -> std::io::Result<SliceOutcome> {
    let size = std::mem::size_of::<libc::sched_attr>() as u32;
    // SAFETY: `attr` is a plain-data struct of the size passed in `size`; pid 0 names the calling
    // thread; the kernel only reads/writes within it.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    let got = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr, size, 0) };
    if got != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if attr.sched_policy != libc::SCHED_OTHER as u32 {
        // Batch, idle or real-time threads are somebody's deliberate choice: leave them be.
        return Ok(SliceOutcome::Unsupported);
    }
    let wanted = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    let mut set = attr;
    set.size = size;
    set.sched_flags = 0;
    set.sched_runtime = wanted;
    // SAFETY: as above; the kernel only reads `set`.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &set, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let mut check: libc::sched_attr = unsafe { std::mem::zeroed() };
    let got = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut check, size, 0) };
    if got != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Kernels that know custom slices report the slice in use as `sched_runtime`; older ones
    // report 0 for normal threads.
    if check.sched_runtime == 0 {
        return Ok(SliceOutcome::Unsupported);
    }
    Ok(SliceOutcome::Applied(Duration::from_nanos(
        check.sched_runtime,
    )))
}

#[cfg(not(target_os = "linux"))]
pub fn request_short_slice(_slice: Duration) -> std::io::Result<SliceOutcome> {
    Ok(SliceOutcome::Unsupported)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_thread_gets_the_slice_it_asks_for_or_a_clear_unsupported() {
        // A fresh thread, so the test runner's own thread keeps its slice.
        let outcome = std::thread::spawn(|| request_short_slice(Duration::from_micros(200)))
            .join()
            .unwrap()
            .unwrap();
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release.trim().split(['.', '-']);
        let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if (major, minor) >= (6, 12) {
            assert_eq!(outcome, SliceOutcome::Applied(Duration::from_micros(200)));
        } else {
            assert_eq!(outcome, SliceOutcome::Unsupported);
        }
    }
}
