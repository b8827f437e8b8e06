//! The sampler against the fake `libnvidia-ml` (crate `fake-nvml`), loaded through the production
//! `nvml-wrapper` path. Each test copies the library into its own folder next to its script, so
//! tests in one process drive independent fakes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::*;

/// The fake library: `FAKE_NVML_LIB`, else the workspace target folder (built on demand).
fn fake_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("FAKE_NVML_LIB") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let lib = target.join("debug/libnvidia_ml_fake.so");
    static BUILT: Mutex<bool> = Mutex::new(false);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !*built {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "fake-nvml"])
            .current_dir(&root)
            .status()
            .expect("run cargo build -p fake-nvml");
        assert!(status.success(), "cargo build -p fake-nvml failed");
        *built = true;
    }
    assert!(lib.exists(), "{} missing after build", lib.display());
    lib
}

struct Fake {
    dir: tempfile::TempDir,
    lib: PathBuf,
}

impl Fake {
    fn new(script: &Value) -> Fake {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(fake_lib(), &lib).expect("copy fake lib");
        let f = Fake { dir, lib };
        f.write(script);
        f
    }

    /// Replaces the script atomically; the fake notices within 50 ms.
    fn write(&self, script: &Value) {
        let tmp = self.dir.path().join("script.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(script).expect("json")).expect("write");
        std::fs::rename(&tmp, self.dir.path().join("fake-nvml.json")).expect("rename");
    }

    fn cfg(&self) -> GpuConfig {
        GpuConfig {
            nvml_library: Some(self.lib.clone()),
            period: Duration::from_millis(100),
            call_timeout: Duration::from_millis(400),
            xid_unhealthy_hold: Duration::from_millis(800),
            ..GpuConfig::default()
        }
    }
}

fn gpu(i: u32) -> Value {
    json!({
        "uuid": format!("GPU-0000000{i}-1111-2222-3333-44444444444{i}"),
        "name": "NVIDIA H200",
        "pci_bus_id": format!("00000000:{:02X}:00.0", 0x19 + i),
        "memory_total": 150_754_820_096u64,
        "memory_used": 1_000_000_000u64 * u64::from(i + 1),
        "utilization": 40 + i,
        "memory_utilization": 20 + i,
    })
}

/// Polls `sample` until `pred` holds (or panics after 5 s) and returns the matching snapshot.
fn until(s: &mut GpuSampler, what: &str, pred: impl Fn(&GpuSnapshot) -> bool) -> GpuSnapshot {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = Vec::new();
    loop {
        let mut snap = s.sample(SystemTime::now());
        events.append(&mut snap.events);
        if pred(&snap) {
            snap.events = events;
            return snap;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {snap:#?}"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn encoded(snap: &GpuSnapshot) -> String {
    let mut s = String::new();
    encode_to_string(snap, &mut s).expect("encode");
    s
}

/// The value of the one line starting with `prefix` (metric name and labels).
fn metric(text: &str, name: &str, must_contain: &[&str]) -> Option<f64> {
    let found: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| must_contain.iter().all(|m| l.contains(m)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(
        found.len() <= 1,
        "{name} {must_contain:?} matched {found:?}"
    );
    found.first().copied()
}

#[test]
fn reports_every_metric_from_the_script() {
    let mut g0 = gpu(0);
    let extra = json!({
        "sm_clock_mhz": 1755, "memory_clock_mhz": 2619, "power_mw": 350_500, "power_limit_mw": 700_000,
        "energy_mj": 5_000_000u64, "temperature_c": 51, "throttle_reasons": 0x4 | 0x40,
        "pcie_tx_kbps": 1000, "pcie_rx_kbps": 2000, "ecc_corrected": 12, "ecc_uncorrected": 1,
        "retired_pages_sbe": 2, "retired_pages_dbe": 1, "remapped_correctable": 3, "remapped_uncorrectable": 0,
        "gpm": {"sm_util": 37.5, "sm_occupancy": 20, "tensor_util": 12.5, "dram_bw_util": 60},
    });
    for (k, v) in extra.as_object().expect("object") {
        g0[k] = v.clone();
    }
    let mut g1 = gpu(1);
    g1["mig_mode"] = json!(1);
    g1["mig_instances"] = json!(3);
    g1["unsupported"] = json!(["nvmlDeviceGetPcieThroughput", "nvmlDeviceGetTotalEccErrors"]);
    let fake = Fake::new(&json!({"driver_version": "550.54.15", "gpus": [g0, g1]}));
    let mut s = GpuSampler::new(&fake.cfg(), Path::new("/proc"));
    let snap = until(&mut s, "GPM values", |s| {
        s.gpus
            .first()
            .and_then(|g| g.stats.gpm_sm_activity_ratio)
            .is_some()
    });
    assert_eq!(
        snap.status,
        NvmlStatus::Up {
            driver_version: "550.54.15".into()
        }
    );
    assert_eq!(snap.gpus.len(), 2);
    let a = &snap.gpus[0];
    assert_eq!(a.id.uuid, "GPU-00000000-1111-2222-3333-444444444440");
    assert_eq!(a.id.pci_bus_id, "00000000:19:00.0");
    assert_eq!(a.id.model, "NVIDIA H200");
    assert!(a.health.healthy, "{:?}", a.health);
    let st = &a.stats;
    assert_eq!(st.utilization_ratio, Some(0.40));
    assert_eq!(st.memory_utilization_ratio, Some(0.20));
    assert_eq!(st.memory_used_bytes, Some(1_000_000_000));
    assert_eq!(st.memory_total_bytes, Some(150_754_820_096));
    assert_eq!(st.memory_free_bytes, Some(150_754_820_096 - 1_000_000_000));
    assert_eq!(st.sm_clock_hertz, Some(1755e6));
    assert_eq!(st.memory_clock_hertz, Some(2619e6));
    assert_eq!(st.power_watts, Some(350.5));
    assert_eq!(st.power_limit_watts, Some(700.0));
    let energy = st.energy_joules.expect("energy");
    assert!(
        (5000.0..5000.0 + 350.5 * 30.0).contains(&energy),
        "{energy}"
    );
    assert_eq!(st.temperature_celsius, Some(51.0));
    assert_eq!(st.throttle_reasons, Some(0x44));
    assert_eq!(st.pcie_tx_bytes_per_second, Some(1000.0 * 1024.0));
    assert_eq!(st.pcie_rx_bytes_per_second, Some(2000.0 * 1024.0));
    assert_eq!(st.ecc_corrected_errors, Some(12));
    assert_eq!(st.ecc_uncorrected_errors, Some(1));
    assert_eq!(st.retired_pages_single_bit, Some(2));
    assert_eq!(st.retired_pages_double_bit, Some(1));
    assert_eq!(st.remapped_rows_correctable, Some(3));
    assert_eq!(st.mig_enabled, Some(false));
    assert_eq!(st.gpm_sm_activity_ratio, Some(0.375));
    assert_eq!(st.gpm_sm_occupancy_ratio, Some(0.20));
    assert_eq!(st.gpm_tensor_activity_ratio, Some(0.125));
    assert_eq!(st.gpm_dram_bandwidth_ratio, Some(0.60));
    let b = &snap.gpus[1];
    assert!(
        b.health.healthy,
        "unsupported calls are not faults: {:?}",
        b.health
    );
    assert_eq!(b.stats.utilization_ratio, Some(0.41));
    assert_eq!(b.stats.mig_enabled, Some(true));
    assert_eq!(b.stats.mig_instances, Some(3));
    let mig_base = format!("MIG-{}", b.id.uuid.trim_start_matches("GPU-"));
    assert_eq!(
        b.stats.mig_uuids,
        (0..3)
            .map(|k| format!("{mig_base}-{k}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(b.stats.pcie_tx_bytes_per_second, None);
    assert_eq!(b.stats.ecc_corrected_errors, None);
    assert_eq!(
        b.stats.gpm_sm_activity_ratio, None,
        "no GPM without support"
    );
    assert!(b.unsupported.contains(&"nvmlDeviceGetPcieThroughput(TX)"));
    assert!(
        b.unsupported.contains(&"nvmlGpmQueryDeviceSupport")
            || b.stats.gpm_sm_activity_ratio.is_none()
    );

    let text = encoded(&snap);
    let g0l = [
        "gpu=\"0\"",
        "UUID=\"GPU-00000000-1111-2222-3333-444444444440\"",
        "pci_bus_id=\"00000000:19:00.0\"",
        "modelName=\"NVIDIA H200\"",
        "Hostname=\"test-host\"",
    ];
    assert_eq!(
        metric(&text, "headroom_gpu_utilization_ratio", &g0l),
        Some(0.40)
    );
    assert_eq!(
        metric(&text, "headroom_gpu_memory_used_bytes", &g0l),
        Some(1e9)
    );
    assert_eq!(metric(&text, "headroom_gpu_power_watts", &g0l), Some(350.5));
    assert_eq!(metric(&text, "headroom_gpu_healthy", &g0l), Some(1.0));
    assert_eq!(
        metric(
            &text,
            "headroom_gpu_throttle_reason_active",
            &["gpu=\"0\"", "reason=\"hw_thermal_slowdown\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "headroom_gpu_throttle_reason_active",
            &["gpu=\"0\"", "reason=\"gpu_idle\""]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            "headroom_gpu_ecc_errors_total",
            &["gpu=\"0\"", "type=\"corrected\""]
        ),
        Some(12.0)
    );
    assert_eq!(
        metric(&text, "headroom_gpu_mig_instances", &["gpu=\"1\""]),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            "headroom_gpu_nvml_call_unsupported",
            &["gpu=\"1\"", "call=\"nvmlDeviceGetPcieThroughput(TX)\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "headroom_gpu_pcie_tx_bytes_per_second",
            &["gpu=\"1\""]
        ),
        None
    );
    assert!(
        text.contains("# TYPE headroom_gpu_energy_joules counter"),
        "{text}"
    );

    let series = snap.series();
    assert!(series.contains(&(
        "gpu_utilization_ratio".to_owned(),
        vec![(
            "UUID".to_owned(),
            "GPU-00000001-1111-2222-3333-444444444441".to_owned()
        )],
        0.41
    )));
}

/// Real child processes whose PIDs the script lists, attributed through a proc tree the test
/// controls (the e2e test does the same with real cgroups).
#[test]
fn attributes_processes_to_containers() {
    let mut kids: Vec<Child> = (0..3)
        .map(|_| {
            Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("spawn sleep")
        })
        .collect();
    let pids: Vec<u32> = kids.iter().map(Child::id).collect();
    let proc_root = tempfile::tempdir().expect("tempdir");
    let cgroups = [
        "/kubepods/pod-a/ctr-1",
        "/kubepods/pod-a/ctr-1",
        "/kubepods/pod-b/ctr-2",
    ];
    for (pid, cg) in pids.iter().zip(cgroups) {
        let d = proc_root.path().join(pid.to_string());
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("cgroup"), format!("4:memory:/other\n0::{cg}\n")).expect("write");
        let stat = format!("{pid} (sleep) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0 0\n");
        std::fs::write(d.join("stat"), stat).expect("write");
    }
    let mut g0 = gpu(0);
    g0["processes"] = json!([
        {"pid": pids[0], "memory_used": 100_000_000u64, "sm_util": 30, "mem_util": 10},
        {"pid": pids[1], "memory_used": 200_000_000u64, "sm_util": 20, "mem_util": 5},
        {"pid": pids[2], "memory_used": 400_000_000u64, "sm_util": 0},
        {"pid": 999_999_999u32, "memory_used": 7u64, "sm_util": 1},
    ]);
    let mut g1 = gpu(1);
    g1["processes"] = json!([{"pid": pids[2], "memory_used": 50u64, "sm_util": 70}]);
    let fake = Fake::new(&json!({"gpus": [g0, g1]}));
    let mut s = GpuSampler::new(&fake.cfg(), proc_root.path());
    let snap = until(&mut s, "5 processes with utilisation", |s| {
        s.processes.len() == 5
            && s.processes.iter().all(|p| p.sm_utilization_ratio.is_some())
            && s.processes
                .iter()
                .any(|p| p.sm_utilization_ratio == Some(0.70))
    });
    let a = snap
        .containers
        .iter()
        .find(|c| c.gpu == 0 && c.cgroup == "/kubepods/pod-a/ctr-1")
        .expect("container a on gpu 0");
    assert_eq!(a.processes, 2);
    assert_eq!(a.memory_used_bytes, 300_000_000);
    assert!((a.sm_utilization_ratio - 0.50).abs() < 1e-9, "{a:?}");
    assert!((a.memory_utilization_ratio - 0.15).abs() < 1e-9, "{a:?}");
    let b0 = snap
        .containers
        .iter()
        .find(|c| c.gpu == 0 && c.cgroup == "/kubepods/pod-b/ctr-2")
        .expect("container b on gpu 0");
    assert_eq!(b0.memory_used_bytes, 400_000_000);
    let b1 = snap
        .containers
        .iter()
        .find(|c| c.gpu == 1 && c.cgroup == "/kubepods/pod-b/ctr-2")
        .expect("container b on gpu 1");
    assert_eq!(b1.memory_used_bytes, 50);
    assert!((b1.sm_utilization_ratio - 0.70).abs() < 1e-9);
    assert_eq!(
        snap.containers.len(),
        3,
        "the unresolvable PID is in no container"
    );
    let ghost = snap
        .processes
        .iter()
        .find(|p| p.pid == 999_999_999)
        .expect("ghost pid reported");
    assert_eq!(ghost.cgroup, None);

    let mut text = String::new();
    let snap2 = snap.clone();
    #[derive(Debug)]
    struct C(GpuSnapshot);
    impl prometheus_client::collector::Collector for C {
        fn encode(
            &self,
            mut e: prometheus_client::encoding::DescriptorEncoder,
        ) -> std::fmt::Result {
            self.0.encode(&mut e, "node-1", &|cg| {
                let parts: Vec<&str> = cg.split('/').collect();
                vec![
                    ("namespace".into(), "default".into()),
                    ("pod".into(), parts.get(2).copied().unwrap_or("").into()),
                    (
                        "container".into(),
                        parts.get(3).copied().unwrap_or("").into(),
                    ),
                ]
            })
        }
    }
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register_collector(Box::new(C(snap2)));
    prometheus_client::encoding::text::encode(&mut text, &reg).expect("encode");
    assert_eq!(
        metric(
            &text,
            "headroom_gpu_container_memory_used_bytes",
            &[
                "gpu=\"0\"",
                "cgroup=\"/kubepods/pod-a/ctr-1\"",
                "pod=\"pod-a\"",
                "container=\"ctr-1\"",
                "namespace=\"default\"",
                "Hostname=\"node-1\""
            ]
        ),
        Some(3e8)
    );
    assert_eq!(
        metric(
            &text,
            "headroom_gpu_process_memory_used_bytes",
            &[
                "gpu=\"1\"",
                &format!("pid=\"{}\"", pids[2]),
                "cgroup=\"/kubepods/pod-b/ctr-2\""
            ]
        ),
        Some(50.0)
    );
    let series = snap.series();
    assert!(
        series
            .iter()
            .any(|(n, l, v)| n == "container_gpu_memory_used_bytes"
                && l.contains(&("cgroup".to_owned(), "/kubepods/pod-a/ctr-1".to_owned()))
                && *v == 3e8)
    );
    for k in &mut kids {
        let _ = k.kill();
        let _ = k.wait();
    }
}

/// More processes than nvml-wrapper's 5 spare slots: exercises the insufficient-size protocol.
#[test]
fn lists_many_processes() {
    let mut g0 = gpu(0);
    let procs: Vec<Value> = (0..40)
        .map(|k| json!({"pid": 4_000_000 + k, "memory_used": 1000 + k, "sm_util": k % 7}))
        .collect();
    g0["processes"] = json!(procs);
    let fake = Fake::new(&json!({"gpus": [g0]}));
    let mut s = GpuSampler::new(&fake.cfg(), Path::new("/proc"));
    let snap = until(&mut s, "40 processes", |s| s.processes.len() == 40);
    let total: u64 = snap
        .processes
        .iter()
        .filter_map(|p| p.memory_used_bytes)
        .sum();
    assert_eq!(total, (0..40).map(|k| 1000 + k).sum::<u64>());
}

#[test]
fn replays_a_real_trace() {
    let trace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fake-nvml/traces/alibaba_gpu_util_mean_57s_head120.csv");
    let points: Vec<f64> = std::fs::read_to_string(&trace)
        .expect("trace")
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1)?.parse().ok())
        .collect();
    assert_eq!(points.len(), 120);
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let step = 300u64;
    let mut g0 = gpu(0);
    g0["utilization"] = json!({"trace": trace, "scale": 5.0, "step_ms": step});
    let fake = Fake::new(&json!({"epoch_ms": epoch, "gpus": [g0]}));
    let mut s = GpuSampler::new(&fake.cfg(), Path::new("/proc"));
    let mut seen = std::collections::BTreeSet::new();
    let mut values = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        let snap = s.sample(SystemTime::now());
        let Some(u) = snap.gpus.first().and_then(|g| g.stats.utilization_ratio) else {
            continue;
        };
        let at = snap
            .at
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        let idx = |t: u64| ((t - epoch) / step) as usize % points.len();
        let expect: Vec<f64> = [at, at + 100]
            .iter()
            .map(|t| (points[idx(*t)] * 5.0).round().clamp(0.0, 100.0) / 100.0)
            .collect();
        assert!(
            expect.iter().any(|e| (e - u).abs() < 1e-9),
            "utilisation {u} at t+{} ms, trace says {expect:?}",
            at - epoch
        );
        seen.insert(idx(at));
        values.insert((u * 100.0) as u64);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        seen.len() >= 8,
        "the replay moved through the trace: {seen:?}"
    );
    assert!(values.len() >= 4, "the trace varies: {values:?}");
}

/// Captures the sampler's log lines (health changes are logged on the calling thread).
fn with_logs<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8_lossy(
        &buf.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
    .into_owned();
    (out, text.lines().map(str::to_owned).collect())
}

/// Injects `fault` into GPU 1, expects it unhealthy with `reason` while GPU 0 keeps reporting,
/// then clears it and expects recovery: one event and one log line each way.
fn fault_roundtrip(fault: Value, reason: &str) {
    let base = json!({"gpus": [gpu(0), gpu(1)]});
    let fake = Fake::new(&base);
    let mut s = GpuSampler::new(&fake.cfg(), Path::new("/proc"));
    let ((), logs) = with_logs(|| {
        until(&mut s, "two healthy GPUs", |s| {
            s.gpus.len() == 2
                && s.gpus
                    .iter()
                    .all(|g| g.health.healthy && g.stats.utilization_ratio.is_some())
        });
        let mut faulty = base.clone();
        for (k, v) in fault.as_object().expect("fault object") {
            faulty["gpus"][1][k] = v.clone();
        }
        fake.write(&faulty);
        let bad = until(&mut s, "GPU 1 unhealthy", |s| !s.gpus[1].health.healthy);
        let why = bad.gpus[1].health.reason.clone().unwrap_or_default();
        assert!(why.contains(reason), "reason {why:?} lacks {reason:?}");
        assert_eq!(bad.events.len(), 1, "{:?}", bad.events);
        assert!(!bad.events[0].healthy);
        assert_eq!(bad.events[0].uuid, bad.gpus[1].id.uuid);
        assert!(bad.gpus[0].health.healthy);
        assert_eq!(bad.gpus[0].stats.utilization_ratio, Some(0.40));
        let text = encoded(&bad);
        assert_eq!(
            metric(&text, "headroom_gpu_healthy", &["gpu=\"1\""]),
            Some(0.0)
        );
        assert_eq!(
            metric(&text, "headroom_gpu_healthy", &["gpu=\"0\""]),
            Some(1.0)
        );
        // Stays unhealthy without further events while the fault lasts.
        std::thread::sleep(Duration::from_millis(300));
        let still = s.sample(SystemTime::now());
        if !reason.starts_with("XID") {
            assert!(!still.gpus[1].health.healthy);
        }
        assert!(still.events.is_empty(), "{:?}", still.events);
        fake.write(&base);
        let good = until(&mut s, "GPU 1 healthy again", |s| s.gpus[1].health.healthy);
        assert_eq!(good.events.len(), 1, "{:?}", good.events);
        assert!(good.events[0].healthy);
        assert_eq!(good.gpus[1].stats.utilization_ratio, Some(0.41));
    });
    let unhealthy: Vec<_> = logs.iter().filter(|l| l.contains("is unhealthy")).collect();
    let healthy: Vec<_> = logs
        .iter()
        .filter(|l| l.contains("healthy again"))
        .collect();
    assert_eq!(unhealthy.len(), 1, "{logs:#?}");
    assert_eq!(healthy.len(), 1, "{logs:#?}");
    assert!(unhealthy[0].contains(reason), "{logs:#?}");
}

#[test]
fn fault_gpu_lost() {
    fault_roundtrip(json!({"lost": true}), "GPU_IS_LOST");
}

#[test]
fn fault_xid_79() {
    fault_roundtrip(json!({"xids": [{"seq": 1, "xid": 79}]}), "XID 79");
}

#[test]
fn fault_error_on_one_call() {
    fault_roundtrip(
        json!({"errors": {"nvmlDeviceGetPowerUsage": 999}}),
        "nvmlDeviceGetPowerUsage failed",
    );
}

#[test]
fn fault_nvml_timeout_code() {
    fault_roundtrip(
        json!({"errors": {"nvmlDeviceGetMemoryInfo_v2": 10}}),
        "nvmlDeviceGetMemoryInfo_v2 failed",
    );
}

#[test]
fn fault_hung_call() {
    fault_roundtrip(
        json!({"delays_ms": {"nvmlDeviceGetTemperature": 1500}}),
        "nvmlDeviceGetTemperature",
    );
}

#[test]
fn application_xid_is_counted_not_unhealthy() {
    let mut g0 = gpu(0);
    g0["xids"] = json!([{"seq": 1, "xid": 13}, {"seq": 2, "xid": 43}]);
    let fake = Fake::new(&json!({"gpus": [g0]}));
    let mut s = GpuSampler::new(&fake.cfg(), Path::new("/proc"));
    let snap = until(&mut s, "two XIDs counted", |s| {
        s.gpus.first().is_some_and(|g| g.stats.xid_errors == 2)
    });
    assert!(snap.gpus[0].health.healthy);
    assert_eq!(snap.gpus[0].stats.last_xid, Some(43));
    assert!(snap.events.is_empty());
}

#[test]
fn missing_library_reports_no_gpus() {
    let cfg = GpuConfig {
        nvml_library: Some(PathBuf::from("/nonexistent/libnvidia-ml.so.1")),
        ..GpuConfig::default()
    };
    let mut s = GpuSampler::new(&cfg, Path::new("/proc"));
    let snap = s.sample(SystemTime::now());
    assert!(snap.gpus.is_empty());
    match &snap.status {
        NvmlStatus::Missing { reason } => {
            assert!(
                reason.contains("/nonexistent/libnvidia-ml.so.1"),
                "{reason}"
            )
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    let text = encoded(&snap);
    assert_eq!(metric(&text, "headroom_gpu_nvml_up", &[]), Some(0.0));
}

#[test]
fn init_failure_reports_no_gpus() {
    let fake = Fake::new(&json!({"init_error": 9, "gpus": [gpu(0)]}));
    let mut s = GpuSampler::new(&fake.cfg(), Path::new("/proc"));
    let snap = s.sample(SystemTime::now());
    assert!(snap.gpus.is_empty());
    assert!(
        matches!(&snap.status, NvmlStatus::Missing { reason } if reason.contains("Driver Not Loaded") || reason.contains("DriverNotLoaded") || reason.contains("driver")),
        "{:?}",
        snap.status
    );
}

#[test]
fn disabled_reports_no_gpus() {
    let cfg = GpuConfig {
        enabled: false,
        ..GpuConfig::default()
    };
    let mut s = GpuSampler::new(&cfg, Path::new("/proc"));
    assert_eq!(s.sample(SystemTime::now()).status, NvmlStatus::Disabled);
}

/// A call the driver refuses for lack of permission (common in unprivileged containers) is
/// remembered as unsupported, not a GPU fault.
#[test]
fn permission_denied_is_not_a_fault() {
    let mut g0 = gpu(0);
    g0["errors"] = json!({"nvmlDeviceGetTotalEnergyConsumption": 4});
    let fake = Fake::new(&json!({"gpus": [g0]}));
    let mut s = GpuSampler::new(&fake.cfg(), Path::new("/proc"));
    let snap = until(&mut s, "a cycle", |s| {
        s.gpus
            .first()
            .is_some_and(|g| g.stats.utilization_ratio.is_some())
    });
    assert!(snap.gpus[0].health.healthy, "{:?}", snap.gpus[0].health);
    assert_eq!(snap.gpus[0].stats.energy_joules, None);
    assert!(
        snap.gpus[0]
            .unsupported
            .contains(&"nvmlDeviceGetTotalEnergyConsumption")
    );
}

/// The kubelet's allocations label a GPU's series with each container holding it (a whole GPU,
/// a MIG device on it, a time-sliced replica), list each device once in
/// `headroom_gpu_allocation`, and leave unallocated GPUs unlabelled.
#[test]
fn allocations_label_the_gpus_they_hold() {
    use crate::kube::pod_resources::DeviceOwner;
    let mut g1 = gpu(1);
    g1["mig_mode"] = json!(1);
    g1["mig_instances"] = json!(2);
    let fake = Fake::new(&json!({"gpus": [gpu(0), g1, gpu(2)]}));
    let mut s = GpuSampler::new(&fake.cfg(), Path::new("/proc"));
    let mut snap = until(&mut s, "MIG UUIDs", |s| {
        s.gpus.get(1).is_some_and(|g| g.stats.mig_uuids.len() == 2)
    });
    let (u0, mig) = (
        snap.gpus[0].id.uuid.clone(),
        snap.gpus[1].stats.mig_uuids[1].clone(),
    );
    let owner = |pod: &str, id: &str, resource: &str| DeviceOwner {
        namespace: "ml".into(),
        pod: pod.into(),
        container: "main".into(),
        resource: resource.into(),
        device_id: id.into(),
    };
    let alloc = crate::kube::pod_resources::DeviceAllocations::from_owners([
        owner("a", &format!("{u0}::0"), "nvidia.com/gpu.shared"),
        owner("b", &format!("{u0}::1"), "nvidia.com/gpu.shared"),
        owner("c", &mig, "nvidia.com/mig-1g.18gb"),
        owner("gone", "GPU-not-on-this-node", "nvidia.com/gpu"),
    ]);
    snap.attach_allocations(&alloc.by_uuid());
    assert_eq!(snap.allocations.len(), 3, "{:?}", snap.allocations);
    let text = encoded(&snap);
    let util = "headroom_gpu_utilization_ratio";
    for pod in ["a", "b"] {
        let want = format!("pod=\"{pod}\"");
        assert!(
            metric(
                &text,
                util,
                &["gpu=\"0\"", "namespace=\"ml\"", &want, "container=\"main\""]
            )
            .is_some(),
            "GPU 0 labelled with pod {pod}:\n{text}"
        );
    }
    assert!(
        metric(&text, util, &["gpu=\"1\"", "pod=\"c\""]).is_some(),
        "MIG holder: {text}"
    );
    assert!(
        metric(&text, util, &["gpu=\"2\""]).is_some_and(|_| !text
            .lines()
            .any(|l| l.starts_with(util) && l.contains("gpu=\"2\"") && l.contains("pod="))),
        "an unallocated GPU has no pod labels: {text}"
    );
    let mig_label = format!("device_id=\"{mig}\"");
    assert_eq!(
        metric(
            &text,
            "headroom_gpu_allocation",
            &[
                "gpu=\"1\"",
                &mig_label,
                "resource=\"nvidia.com/mig-1g.18gb\""
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("headroom_gpu_allocation{"))
            .count(),
        3,
        "{text}"
    );
}
