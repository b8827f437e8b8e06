use std::fs;

use super::*;

fn err<T: std::fmt::Debug>(r: Result<T, Malformed>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn number_and_limit() {
    assert_eq!(number("memory.current", "1048576\n"), Ok(1_048_576));
    assert_eq!(
        err(number("memory.current", "12 kB\n")),
        r#"memory.current holds "12 kB": expected one unsigned integer"#
    );
    assert_eq!(limit("memory.max", "max\n"), Ok(None));
    assert_eq!(limit("memory.high", "2097152\n"), Ok(Some(2_097_152)));
    assert_eq!(
        limit("memory.limit_in_bytes", "9223372036854771712\n"),
        Ok(None),
        "v1's unlimited"
    );
    assert_eq!(
        err(limit("memory.high", "-1")),
        r#"memory.high holds "-1": expected `max` or an unsigned integer"#
    );
}

#[test]
fn cpu_max_pairs() {
    let l = cpu_max("50000 100000\n").unwrap();
    assert_eq!(
        l,
        CpuLimit {
            quota_us: Some(50_000),
            period_us: 100_000
        }
    );
    assert_eq!(l.cores(), Some(0.5));
    assert_eq!(cpu_max("max 100000\n").unwrap().cores(), None);
    for (text, what) in [
        ("max", "expected `<quota|max> <period>`"),
        ("1 2 3", "expected `<quota|max> <period>`"),
        ("50000 abc", "the period is not an unsigned integer"),
        ("50000 0", "the period is zero"),
        ("half 100000", "the quota is neither `max` nor an integer"),
    ] {
        assert_eq!(
            err(cpu_max(text)),
            format!("cpu.max holds {text:?}: {what}")
        );
    }
}

#[test]
fn v1_quota_and_period() {
    assert_eq!(cfs_quota("30000\n"), Ok(Some(30_000)));
    assert_eq!(cfs_quota("-1\n"), Ok(None));
    assert_eq!(
        err(cfs_quota("max")),
        r#"cpu.cfs_quota_us holds "max": expected an integer (-1: no limit)"#
    );
    assert_eq!(cfs_period("100000\n"), Ok(100_000));
    assert_eq!(
        err(cfs_period("0")),
        r#"cpu.cfs_period_us holds "0": the period is zero"#
    );
}

#[test]
fn from_cores_rounds_and_keeps_the_kernel_minimum() {
    assert_eq!(CpuLimit::from_cores(1.25, 100_000).quota_us, Some(125_000));
    assert_eq!(
        CpuLimit::from_cores(0.001, 100_000).quota_us,
        Some(MIN_QUOTA_US)
    );
}

#[test]
fn keyed_reads_wanted_keys_past_a_bad_line() {
    let text =
        "usage_usec 2500000\nnr_periods 10\nbroken\nnr_throttled x\nthrottled_usec 300000\n\n";
    let mut out = [None; 4];
    let e = keyed(
        "cpu.stat",
        text,
        &["usage_usec", "nr_periods", "nr_throttled", "throttled_usec"],
        &mut out,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"cpu.stat holds "broken": expected `<key> <value>`"#
    );
    assert_eq!(out, [Some(2_500_000), Some(10), None, Some(300_000)]);
    let mut out = [None; 1];
    assert_eq!(
        keyed(
            "memory.events",
            "low 0\noom_kill 2\n",
            &["oom_kill"],
            &mut out
        ),
        Ok(())
    );
    assert_eq!(out, [Some(2)]);
    let e = keyed(
        "memory.stat",
        "inactive_file -4\n",
        &["inactive_file"],
        &mut out,
    );
    assert_eq!(
        err(e),
        r#"memory.stat holds "inactive_file -4": the value is not an unsigned integer"#
    );
}

#[test]
fn psi_lines() {
    let text = "some avg10=1.00 avg60=0.50 avg300=0.10 total=1500000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=250000\n";
    assert_eq!(
        pressure("cpu.pressure", text),
        Ok(Psi {
            some_us: 1_500_000,
            full_us: Some(250_000)
        })
    );
    assert_eq!(
        pressure(
            "cpu.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=7\n"
        ),
        Ok(Psi {
            some_us: 7,
            full_us: None
        })
    );
    assert_eq!(
        err(pressure("io.pressure", "full avg10=0.00 total=1\n")),
        r#"io.pressure holds "full avg10=0.00 total=1": no `some` line"#
    );
    assert_eq!(
        err(pressure("memory.pressure", "some avg10=0.00 total=lots\n")),
        r#"memory.pressure holds "some avg10=0.00 total=lots": no `total=<unsigned integer>`"#
    );
}

#[test]
fn errors_name_the_directory_and_cut_long_text() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("cpu.max"), "x".repeat(200)).unwrap();
    let e = CgroupDir::v2(t.path())
        .read_cpu_limit(&mut FileReader::default())
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("in {}, cpu.max holds \"xxx", t.path().display())),
        "{msg}"
    );
    assert!(matches!(e, FileError::Malformed { source, .. } if source.found.len() == 80));
    let e = CgroupDir::v2(t.path())
        .read_memory_high(&mut FileReader::default())
        .unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "cannot read {}",
            t.path().join("memory.high").display()
        )),
        "{e}"
    );
}

#[test]
fn one_type_for_both_versions() {
    let t = tempfile::tempdir().unwrap();
    let v2 = t.path().join("unified/c");
    let cpu = t.path().join("cpu/c");
    let mem = t.path().join("memory/c");
    for d in [&v2, &cpu, &mem] {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(cpu.join("cpu.cfs_quota_us"), "-1\n").unwrap();
    fs::write(cpu.join("cpu.cfs_period_us"), "100000\n").unwrap();
    fs::write(
        mem.join("memory.soft_limit_in_bytes"),
        "9223372036854771712\n",
    )
    .unwrap();
    fs::write(mem.join("memory.limit_in_bytes"), "67108864\n").unwrap();
    let paths = ControllerPaths {
        v2: Some(v2.clone()),
        cpu: Some(cpu.clone()),
        memory: Some(mem.clone()),
        ..Default::default()
    };
    let r = &mut FileReader::default();
    // Hybrid: the v2 directory holds neither limit, so the v1 ones are used.
    let c = paths.cpu_limit_dir().unwrap();
    assert_eq!(c, CgroupDir::v1(&cpu));
    assert_eq!(
        c.read_cpu_limit(r).unwrap(),
        CpuLimit {
            quota_us: None,
            period_us: 100_000
        }
    );
    assert_eq!(c.cpu_burst_file(), None);
    let w = c.cpu_limit_write(CpuLimit::from_cores(0.5, 100_000));
    assert_eq!(
        (w.path, w.value.as_str()),
        (cpu.join("cpu.cfs_quota_us"), "50000")
    );
    let m = paths.memory_limit_dir().unwrap();
    assert_eq!(
        (
            m.read_memory_high(r).unwrap(),
            m.read_memory_max(r).unwrap()
        ),
        (None, Some(64 << 20))
    );
    assert_eq!(
        m.parent(),
        Some(CgroupDir::v1(t.path().join("memory").as_path()))
    );

    fs::write(v2.join("cpu.max"), "max 100000\n").unwrap();
    fs::write(v2.join("memory.high"), "max\n").unwrap();
    fs::write(v2.join("memory.max"), "134217728\n").unwrap();
    let c = paths.cpu_limit_dir().unwrap();
    assert_eq!(c, CgroupDir::v2(&v2));
    assert_eq!(c.read_cpu_limit(r).unwrap().cores(), None);
    assert_eq!(c.cpu_burst_file(), Some(v2.join("cpu.max.burst")));
    assert_eq!(
        c.cpu_limit_write(CpuLimit::from_cores(1.5, 100_000)).value,
        "150000 100000"
    );
    assert_eq!(
        c.cpu_limit_write(CpuLimit {
            quota_us: None,
            period_us: 100_000
        })
        .value,
        "max 100000"
    );
    let m = paths.memory_limit_dir().unwrap();
    assert_eq!(m.memory_max_file(), v2.join("memory.max"));
    assert_eq!(m.read_memory_max(r).unwrap(), Some(128 << 20));
    assert_eq!(ControllerPaths::default().cpu_limit_dir(), None);
}
