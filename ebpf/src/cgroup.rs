//! Mapping a cgroup v2 directory to the id the kernel reports for it. The id eBPF programs see
//! (`bpf_get_current_cgroup_id`, `cgroup->kn->id`) is the inode number of the cgroup's directory on
//! the v2 hierarchy: `/sys/fs/cgroup/...` on a pure v2 node, `/sys/fs/cgroup/unified/...` on a
//! hybrid one. Reads metadata only; never writes a cgroup.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `CGROUP2_SUPER_MAGIC` from `include/uapi/linux/magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cgroup id of the v2 cgroup directory `path`. Fails, naming the path, when it cannot be
/// read or is not a directory on a cgroup2 file system (a v1 controller directory has inodes too,
/// but eBPF never reports them).
pub fn cgroup_id_of(path: &Path) -> io::Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cgroup directory {}: {e}", path.display()),
        )
    })?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cgroup directory {}: not a directory", path.display()),
        ));
    }
    let fs_type = statfs_type(path)?;
    if fs_type != CGROUP2_SUPER_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cgroup directory {}: not on a cgroup2 file system (f_type {fs_type:#x}); \
                 on a hybrid node use the path under /sys/fs/cgroup/unified",
                path.display()
            ),
        ));
    }
    Ok(meta.ino())
}

fn statfs_type(path: &Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cgroup directory {}: path contains a NUL byte",
                path.display()
            ),
        )
    })?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated string and `st` points to writable memory of the
    // right size; statfs only writes into it.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("statfs {}: {e}", path.display()),
        ));
    }
    // SAFETY: statfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64 but differs elsewhere
    Ok(st.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_missing_and_non_cgroup_paths_naming_them() {
        let err = cgroup_id_of(Path::new("/nonexistent/headroom")).expect_err("missing path");
        assert!(err.to_string().contains("/nonexistent/headroom"), "{err}");
        let err = cgroup_id_of(Path::new("/tmp")).expect_err("tmp is not cgroup2");
        assert!(err.to_string().contains("not on a cgroup2"), "{err}");
    }

    #[test]
    fn root_of_the_v2_hierarchy_has_id_1() {
        // The root cgroup's kernfs node is always id 1; skip where no v2 hierarchy is mounted.
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            if let Ok(id) = cgroup_id_of(Path::new(root)) {
                assert_eq!(id, 1, "{root}");
                return;
            }
        }
        println!("SKIP root_of_the_v2_hierarchy_has_id_1: no cgroup2 mount found");
    }
}
