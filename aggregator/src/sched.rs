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
//! A short slice does not help against *other processes* on the same core: fair sharing between
//! them still lets a waking scaler wait for another process's slice. Where the operator allows
//! it (`--scaler-rt-priority`, needs `CAP_SYS_NICE`), the scaler thread instead runs under
//! `SCHED_FIFO`, which preempts every normal thread at once; its work per call is tiny and the
//! kernel's real-time throttling still caps it below a whole core.
//!
//! This module only ever changes the calling thread, and never on its own initiative: the short
//! slice needs no privilege and on kernels that lack it nothing happens; real-time priority is
//! used only when asked for, and threads the caller spawns later do not inherit it.

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

/// Puts the calling thread under `SCHED_FIFO` at `priority` (1–99), with reset-on-fork so that
/// threads it spawns start as normal threads. Fails with `PermissionDenied` without
/// `CAP_SYS_NICE` (or a real-time budget in the thread's cgroup).
#[cfg(target_os = "linux")]
pub fn request_realtime(priority: u8) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: libc::c_int::from(priority),
    };
    // SAFETY: pid 0 names the calling thread; `param` outlives the call.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the calling thread runs under a real-time policy.
#[cfg(target_os = "linux")]
pub fn is_realtime() -> bool {
    // SAFETY: plain getter on the calling thread.
    let p = unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK;
    p == libc::SCHED_FIFO || p == libc::SCHED_RR
}

#[cfg(not(target_os = "linux"))]
pub fn is_realtime() -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
pub fn request_realtime(_priority: u8) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "real-time scheduling is only used on Linux",
    ))
}

#[cfg(not(target_os = "linux"))]
pub fn request_short_slice(_slice: Duration) -> std::io::Result<SliceOutcome> {
    Ok(SliceOutcome::Unsupported)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn realtime_priority_applies_to_the_calling_thread_only() {
        let (outcome, policy, child) = std::thread::spawn(|| {
            let outcome = request_realtime(1);
            // SAFETY: plain getters on the calling thread.
            let policy = unsafe { libc::sched_getscheduler(0) };
            let child = std::thread::spawn(|| unsafe { libc::sched_getscheduler(0) })
                .join()
                .unwrap();
            (outcome, policy, child)
        })
        .join()
        .unwrap();
        // SAFETY: as above.
        let here = unsafe { libc::sched_getscheduler(0) };
        assert_eq!(here, libc::SCHED_OTHER, "the test thread is untouched");
        match outcome {
            Ok(()) => {
                assert_eq!(policy & !libc::SCHED_RESET_ON_FORK, libc::SCHED_FIFO);
                assert_eq!(
                    child,
                    libc::SCHED_OTHER,
                    "spawned threads start as normal threads"
                );
            }
            Err(e) => {
                // Without CAP_SYS_NICE (or a real-time budget in the cgroup): refused, nothing changed.
                assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
                assert_eq!(policy, libc::SCHED_OTHER);
            }
        }
    }

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
