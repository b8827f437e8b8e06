//! The script a test writes to describe the fake GPUs: their identity, the values each NVML query
//! returns (constants or replayed traces), their processes, and the faults to inject. Parsing and
//! evaluation only; it never touches the C ABI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// Whole-library settings and the GPUs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    #[serde(default = "default_driver")]
    pub driver_version: String,
    #[serde(default = "default_nvml_version")]
    pub nvml_version: String,
    #[serde(default = "default_cuda")]
    pub cuda_driver_version: i32,
    /// Unix time (ms) at which every trace starts replaying; defaults to when the script was loaded.
    #[serde(default)]
    pub epoch_ms: Option<u64>,
    /// Makes `nvmlInit_v2` fail with this NVML return code (e.g. 9: driver not loaded).
    #[serde(default)]
    pub init_error: Option<u32>,
    /// Return codes for named calls on every GPU (and for calls that take no device).
    #[serde(default)]
    pub errors: BTreeMap<String, u32>,
    /// Milliseconds a named call sleeps before answering, on every GPU.
    #[serde(default)]
    pub delays_ms: BTreeMap<String, u64>,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
}

fn default_driver() -> String {
    "550.54.15".to_owned()
}
fn default_nvml_version() -> String {
    "12.550.54.15".to_owned()
}
fn default_cuda() -> i32 {
    12040
}

/// One fake GPU. Numbers follow NVML's units (bytes, MHz, mW, mJ, °C, KB/s, percent).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    pub uuid: String,
    #[serde(default = "default_name")]
    pub name: String,
    pub pci_bus_id: String,
    #[serde(default = "default_mem_total")]
    pub memory_total: u64,
    #[serde(default)]
    pub memory_reserved: u64,
    #[serde(default)]
    pub memory_used: Value,
    #[serde(default)]
    pub utilization: Value,
    #[serde(default)]
    pub memory_utilization: Value,
    #[serde(default = "default_sm_clock")]
    pub sm_clock_mhz: Value,
    #[serde(default = "default_mem_clock")]
    pub memory_clock_mhz: Value,
    #[serde(default = "default_power")]
    pub power_mw: Value,
    #[serde(default = "default_power_limit")]
    pub power_limit_mw: u32,
    /// Energy at `epoch_ms`; it then grows by `power_mw` integrated over time.
    #[serde(default)]
    pub energy_mj: u64,
    #[serde(default = "default_temp")]
    pub temperature_c: Value,
    #[serde(default)]
    pub throttle_reasons: u64,
    #[serde(default)]
    pub pcie_tx_kbps: Value,
    #[serde(default)]
    pub pcie_rx_kbps: Value,
    #[serde(default)]
    pub ecc_corrected: u64,
    #[serde(default)]
    pub ecc_uncorrected: u64,
    #[serde(default)]
    pub retired_pages_sbe: u32,
    #[serde(default)]
    pub retired_pages_dbe: u32,
    #[serde(default)]
    pub remapped_correctable: u32,
    #[serde(default)]
    pub remapped_uncorrectable: u32,
    #[serde(default)]
    pub mig_mode: u32,
    #[serde(default)]
    pub mig_instances: u32,
    /// GPM metrics (percent); absent means the device does not support GPM (pre-Hopper).
    #[serde(default)]
    pub gpm: Option<Gpm>,
    #[serde(default)]
    pub processes: Vec<Process>,
    /// Every call on this GPU returns `NVML_ERROR_GPU_IS_LOST`.
    #[serde(default)]
    pub lost: bool,
    /// Calls answering `NVML_ERROR_NOT_SUPPORTED` on this GPU.
    #[serde(default)]
    pub unsupported: Vec<String>,
    #[serde(default)]
    pub errors: BTreeMap<String, u32>,
    #[serde(default)]
    pub delays_ms: BTreeMap<String, u64>,
    /// XID critical errors; each `seq` is delivered once to every event set registered on this GPU.
    #[serde(default)]
    pub xids: Vec<Xid>,
}

fn default_name() -> String {
    "NVIDIA H200".to_owned()
}
fn default_mem_total() -> u64 {
    150_754_820_096
}
fn default_sm_clock() -> Value {
    Value::Const(1980.0)
}
fn default_mem_clock() -> Value {
    Value::Const(2619.0)
}
fn default_power() -> Value {
    Value::Const(120_000.0)
}
fn default_power_limit() -> u32 {
    700_000
}
fn default_temp() -> Value {
    Value::Const(35.0)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpm {
    #[serde(default)]
    pub sm_util: Value,
    #[serde(default)]
    pub sm_occupancy: Value,
    #[serde(default)]
    pub tensor_util: Value,
    #[serde(default)]
    pub dram_bw_util: Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub pid: u32,
    #[serde(default)]
    pub memory_used: Value,
    #[serde(default)]
    pub sm_util: Value,
    #[serde(default)]
    pub mem_util: Value,
    #[serde(default)]
    pub enc_util: Value,
    #[serde(default)]
    pub dec_util: Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xid {
    pub seq: u64,
    pub xid: u64,
}

/// A number, or a trace replayed from a `timestamp_s,value` CSV: value × scale at
/// index ((now − epoch) / step_ms) mod length.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Const(f64),
    Trace(TraceSpec),
}

impl Default for Value {
    fn default() -> Self {
        Value::Const(0.0)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSpec {
    pub trace: PathBuf,
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default = "thousand")]
    pub step_ms: u64,
    /// Points loaded at script load time; never read from the script itself.
    #[serde(skip)]
    pub points: Vec<f64>,
}

fn one() -> f64 {
    1.0
}
fn thousand() -> u64 {
    1000
}

impl Value {
    pub fn at(&self, elapsed_ms: u64) -> f64 {
        match self {
            Value::Const(v) => *v,
            Value::Trace(t) => {
                if t.points.is_empty() {
                    return 0.0;
                }
                let idx = (elapsed_ms / t.step_ms.max(1)) as usize % t.points.len();
                t.points[idx] * t.scale
            }
        }
    }

    fn load(&mut self, base: &Path) -> Result<(), String> {
        if let Value::Trace(t) = self {
            let path = if t.trace.is_absolute() {
                t.trace.clone()
            } else {
                base.join(&t.trace)
            };
            t.points = read_trace(&path)?;
        }
        Ok(())
    }
}

/// Reads the value column of a `timestamp_s,value` CSV (header line optional).
pub fn read_trace(path: &Path) -> Result<Vec<f64>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("trace {}: {e}", path.display()))?;
    let mut points = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some(value) = line.split(',').nth(1) else {
            return Err(format!(
                "trace {} line {}: no value column",
                path.display(),
                n + 1
            ));
        };
        match value.trim().parse::<f64>() {
            Ok(v) => points.push(v),
            Err(_) if n == 0 => {} // header
            Err(e) => {
                return Err(format!("trace {} line {}: {e}", path.display(), n + 1));
            }
        }
    }
    if points.is_empty() {
        return Err(format!("trace {}: no points", path.display()));
    }
    Ok(points)
}

impl Script {
    /// Parses a script and loads the traces it names (relative to the script's folder).
    pub fn load(path: &Path) -> Result<Script, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("script {}: {e}", path.display()))?;
        let mut script: Script =
            serde_json::from_str(&text).map_err(|e| format!("script {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        for gpu in &mut script.gpus {
            for v in [
                &mut gpu.memory_used,
                &mut gpu.utilization,
                &mut gpu.memory_utilization,
                &mut gpu.sm_clock_mhz,
                &mut gpu.memory_clock_mhz,
                &mut gpu.power_mw,
                &mut gpu.temperature_c,
                &mut gpu.pcie_tx_kbps,
                &mut gpu.pcie_rx_kbps,
            ] {
                v.load(&base)?;
            }
            if let Some(g) = &mut gpu.gpm {
                for v in [
                    &mut g.sm_util,
                    &mut g.sm_occupancy,
                    &mut g.tensor_util,
                    &mut g.dram_bw_util,
                ] {
                    v.load(&base)?;
                }
            }
            for p in &mut gpu.processes {
                for v in [
                    &mut p.memory_used,
                    &mut p.sm_util,
                    &mut p.mem_util,
                    &mut p.enc_util,
                    &mut p.dec_util,
                ] {
                    v.load(&base)?;
                }
            }
            if gpu.uuid.len() >= 96 || gpu.name.len() >= 96 || gpu.pci_bus_id.len() >= 32 {
                return Err(format!(
                    "script {}: uuid/name must be < 96 bytes and pci_bus_id < 32",
                    path.display()
                ));
            }
        }
        Ok(script)
    }

    /// The replay clock: milliseconds since `epoch_ms` (or since `loaded_ms`).
    pub fn elapsed_ms(&self, loaded_ms: u64) -> u64 {
        now_ms().saturating_sub(self.epoch_ms.unwrap_or(loaded_ms))
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
