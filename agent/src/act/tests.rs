use super::*;

fn v1_tree(root: &Path, rel: &str, quota: &str) -> PathBuf {
    let d = root.join("cpu").join(rel);
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("cpu.cfs_quota_us"), quota).unwrap();
    fs::write(d.join("cpu.cfs_period_us"), "100000").unwrap();
    d
}

fn actuator(t: &Path) -> Actuator {
    Actuator::open(StateDir::open(&t.join("state")).unwrap()).unwrap()
}

#[test]
fn v1_cpu_write_records_original_and_restores_it() {
    let t = tempfile::tempdir().unwrap();
    let d = v1_tree(t.path(), "a", "50000");
    let paths = ControllerPaths {
        cpu: Some(d.clone()),
        ..Default::default()
    };
    let mut a = actuator(t.path());
    let w = a
        .apply(&paths, Resource::Cpu, Some(0.5), 1.25, Allow::default())
        .unwrap();
    assert_eq!(w.len(), 1);
    assert_eq!(
        fs::read_to_string(d.join("cpu.cfs_quota_us")).unwrap(),
        "125000"
    );
    // A second agent (after a crash) finds the original in the journal.
    let mut b = actuator(t.path());
    assert_eq!(b.changed().count(), 1);
    let (n, errs) = b.restore_all();
    assert_eq!((n, errs.len()), (1, 0));
    assert_eq!(
        fs::read_to_string(d.join("cpu.cfs_quota_us")).unwrap(),
        "50000"
    );
    assert_eq!(actuator(t.path()).changed().count(), 0);
}

#[test]
fn drifted_value_is_not_overwritten() {
    let t = tempfile::tempdir().unwrap();
    let d = v1_tree(t.path(), "a", "70000");
    let paths = ControllerPaths {
        cpu: Some(d.clone()),
        ..Default::default()
    };
    let mut a = actuator(t.path());
    let e = a
        .apply(&paths, Resource::Cpu, Some(0.5), 1.0, Allow::default())
        .unwrap_err();
    assert!(
        matches!(e, ActError::Drifted { actual: Some(v), .. } if (v - 0.7).abs() < 1e-9),
        "{e}"
    );
    assert_eq!(
        fs::read_to_string(d.join("cpu.cfs_quota_us")).unwrap(),
        "70000"
    );
}

#[test]
fn parent_quota_caps_or_is_raised_first() {
    let t = tempfile::tempdir().unwrap();
    let pod = v1_tree(t.path(), "pod", "100000");
    let c = v1_tree(t.path(), "pod/c", "80000");
    let paths = ControllerPaths {
        cpu: Some(c.clone()),
        ..Default::default()
    };
    let a = actuator(t.path());
    let w = a
        .plan_cpu(&paths, Some(0.8), 1.5, Allow::default())
        .unwrap();
    assert_eq!(
        w,
        vec![Write {
            path: c.join("cpu.cfs_quota_us"),
            value: "100000".into()
        }]
    );
    let allow = Allow {
        raise_parents: true,
        ..Allow::default()
    };
    let w = a.plan_cpu(&paths, Some(0.8), 1.5, allow).unwrap();
    assert_eq!(
        w[0].path,
        pod.join("cpu.cfs_quota_us"),
        "parent first when raising"
    );
    assert_eq!(w[1].path, c.join("cpu.cfs_quota_us"));
}

#[test]
fn v2_memory_raise_moves_max_first_and_lower_moves_high_first() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("unified/x");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("memory.high"), "max").unwrap();
    fs::write(d.join("memory.max"), "134217728").unwrap();
    fs::write(d.join("cpu.max"), "max 100000").unwrap();
    let paths = ControllerPaths {
        v2: Some(d.clone()),
        ..Default::default()
    };
    let mut a = actuator(t.path());
    let allow = Allow {
        memory_max: true,
        memory_max_ratio: 1.25,
        ..Allow::default()
    };
    let w = a
        .apply(&paths, Resource::Memory, None, 256.0 * 1048576.0, allow)
        .unwrap();
    assert_eq!(w[0].path, d.join("memory.max"));
    assert_eq!(w[1].path, d.join("memory.high"));
    assert_eq!(
        fs::read_to_string(d.join("memory.max")).unwrap(),
        (320u64 << 20).to_string()
    );
    let w = a
        .apply(
            &paths,
            Resource::Memory,
            Some(256.0 * 1048576.0),
            64.0 * 1048576.0,
            allow,
        )
        .unwrap();
    assert_eq!(w[0].path, d.join("memory.high"), "soft first when lowering");
    // Never below the original hard limit.
    assert_eq!(
        fs::read_to_string(d.join("memory.max")).unwrap(),
        "134217728"
    );
    // Without permission the hard limit is untouched.
    let w = a
        .apply(
            &paths,
            Resource::Memory,
            Some(64.0 * 1048576.0),
            80.0 * 1048576.0,
            Allow::default(),
        )
        .unwrap();
    assert_eq!(w.len(), 1);
    let w = a
        .apply(&paths, Resource::Cpu, None, 1.5, Allow::default())
        .unwrap();
    assert_eq!(w[0].value, "150000 100000");
    let (n, errs) = a.restore_all();
    assert!(errs.is_empty(), "{errs:?}");
    assert_eq!(n, 3);
    assert_eq!(fs::read_to_string(d.join("memory.high")).unwrap(), "max");
    assert_eq!(fs::read_to_string(d.join("cpu.max")).unwrap(), "max 100000");
}
