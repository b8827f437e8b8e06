//! A stand-in `libnvidia-ml.so.1`: the NVML C ABI (the calls the agent makes, with NVML's structure
//! versions, handle semantics and insufficient-size protocol) answered from a JSON script whose path is
//! given by `FAKE_NVML_SCRIPT`. The script names N GPUs, their processes (real PIDs chosen by the test),
//! values that are constants or replay a trace, and faults (GPU lost, XID events, error codes or delays
//! on single calls). It is re-read when the file changes, so a test can inject and clear faults while the
//! agent runs. Write it atomically (write elsewhere, then rename) so a half-written file is never read.
//! It never links against or imitates the agent's code: it only stands in for the driver.

#![allow(non_snake_case)]
#![allow(non_upper_case_globals)]
#![allow(clippy::missing_safety_doc)]

pub mod script;

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CStr, c_char, c_uint, c_ulonglong};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::ptr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nvml_wrapper_sys::bindings::*;

pub use script::Script;

/// The environment variable naming the script file.
pub const SCRIPT_ENV: &str = "FAKE_NVML_SCRIPT";

const SUCCESS: nvmlReturn_t = nvmlReturn_enum_NVML_SUCCESS;
const UNINITIALIZED: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_UNINITIALIZED;
const INVALID_ARG: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
const NOT_SUPPORTED: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
const NOT_FOUND: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
const INSUFFICIENT_SIZE: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;
const TIMEOUT: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_TIMEOUT;
const GPU_IS_LOST: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST;
const VERSION_MISMATCH: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
const UNKNOWN: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_UNKNOWN;

// Handles are opaque to callers; distinct ranges let a wrong kind of handle be rejected.
const DEVICE_BASE: usize = 0x1000;
const MIG_BASE: usize = 0x10_0000;
const EVENT_SET_BASE: usize = 0x2000_0000;
const GPM_BASE: usize = 0x3000_0000;
const MAX_GPUS: usize = 64;

/// The script used when `FAKE_NVML_SCRIPT` is unset: a file of this name in the folder the library
/// was loaded from. Copies of the library in different folders are independent fakes in one process.
pub const SIBLING_SCRIPT: &str = "fake-nvml.json";

fn script_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(SCRIPT_ENV) {
        return Some(PathBuf::from(p));
    }
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address and fills `info`.
    let found = unsafe { libc::dladdr(nvmlInit_v2 as *const libc::c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr returned a NUL-terminated path owned by the loader.
    let lib = unsafe { CStr::from_ptr(info.dli_fname) };
    let lib = PathBuf::from(std::ffi::OsStr::from_bytes(lib.to_bytes()));
    let p = lib.parent()?.join(SIBLING_SCRIPT);
    p.exists().then_some(p)
}

/// How often calls look at the script file for changes.
const RELOAD_CHECK: Duration = Duration::from_millis(50);

type FileId = (u64, i64, i64, u64);

struct EventSet {
    registered: Vec<(usize, u64)>,
    delivered: BTreeSet<(usize, u64)>,
}

struct State {
    init_count: u32,
    path: PathBuf,
    script: Script,
    loaded_ms: u64,
    file_id: Option<FileId>,
    last_check: Instant,
    energy: Vec<(f64, u64)>,
    event_sets: HashMap<usize, EventSet>,
    gpm_samples: HashMap<usize, Option<(usize, u64)>>,
    next_handle: usize,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn file_id(path: &std::path::Path) -> Option<FileId> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
}

impl State {
    fn refresh(&mut self) {
        if self.last_check.elapsed() < RELOAD_CHECK {
            return;
        }
        self.last_check = Instant::now();
        let id = file_id(&self.path);
        if id == self.file_id {
            return;
        }
        self.file_id = id;
        match Script::load(&self.path) {
            Ok(s) => {
                if s.gpus.len() != self.script.gpus.len() {
                    self.energy = vec![(0.0, script::now_ms()); s.gpus.len()];
                }
                self.script = s;
            }
            Err(e) => eprintln!("fake-nvml: keeping the previous script: {e}"),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.script.elapsed_ms(self.loaded_ms)
    }

    fn device_index(&self, device: nvmlDevice_t) -> Result<usize, nvmlReturn_t> {
        let h = device as usize;
        if (DEVICE_BASE..DEVICE_BASE + MAX_GPUS).contains(&h)
            && h - DEVICE_BASE < self.script.gpus.len()
        {
            Ok(h - DEVICE_BASE)
        } else {
            Err(INVALID_ARG)
        }
    }

    /// Applies the script's faults for `call` on GPU `idx` (or the global ones when `idx` is None);
    /// returns the delay to apply, or the error to answer with.
    fn fault(&self, idx: Option<usize>, call: &str) -> Result<u64, nvmlReturn_t> {
        let s = &self.script;
        if let Some(i) = idx {
            let g = &s.gpus[i];
            if g.lost {
                return Err(GPU_IS_LOST);
            }
            if g.unsupported.iter().any(|c| c == call) {
                return Err(NOT_SUPPORTED);
            }
            if let Some(code) = g.errors.get(call) {
                return Err(*code);
            }
            if let Some(ms) = g.delays_ms.get(call) {
                return Ok(*ms);
            }
        }
        if let Some(code) = s.errors.get(call) {
            return Err(*code);
        }
        Ok(s.delays_ms.get(call).copied().unwrap_or(0))
    }

    fn new_handle(&mut self, base: usize) -> usize {
        self.next_handle += 1;
        base + self.next_handle
    }
}

/// Runs `f` with the state after the init check, script refresh and fault injection for `call`.
/// An injected delay is served without holding the lock, so other callers are not held up.
fn with_state<T>(
    device: Option<nvmlDevice_t>,
    call: &str,
    f: impl FnOnce(&mut State, usize) -> Result<T, nvmlReturn_t>,
) -> nvmlReturn_t {
    let delay = {
        let mut guard = lock();
        let Some(st) = guard.as_mut().filter(|s| s.init_count > 0) else {
            return UNINITIALIZED;
        };
        st.refresh();
        let idx = match device.map(|d| st.device_index(d)).transpose() {
            Ok(i) => i,
            Err(e) => return e,
        };
        match st.fault(idx, call) {
            Err(e) => return e,
            Ok(0) => return code(f(st, idx.unwrap_or(0))),
            Ok(ms) => ms,
        }
    };
    std::thread::sleep(Duration::from_millis(delay));
    let mut guard = lock();
    let Some(st) = guard.as_mut().filter(|s| s.init_count > 0) else {
        return UNINITIALIZED;
    };
    let idx = match device.map(|d| st.device_index(d)).transpose() {
        Ok(i) => i,
        Err(e) => return e,
    };
    code(f(st, idx.unwrap_or(0)))
}

fn code<T>(r: Result<T, nvmlReturn_t>) -> nvmlReturn_t {
    match r {
        Ok(_) => SUCCESS,
        Err(e) => e,
    }
}

unsafe fn out<T>(p: *mut T, v: T) -> Result<(), nvmlReturn_t> {
    if p.is_null() {
        return Err(INVALID_ARG);
    }
    // SAFETY: the caller passed a non-null out-pointer to a T, as the NVML ABI requires.
    unsafe { p.write(v) };
    Ok(())
}

/// Copies `s` NUL-terminated into a caller buffer of `len` bytes.
unsafe fn out_str(buf: *mut c_char, len: c_uint, s: &str) -> Result<(), nvmlReturn_t> {
    if buf.is_null() {
        return Err(INVALID_ARG);
    }
    if s.len() + 1 > len as usize {
        return Err(INSUFFICIENT_SIZE);
    }
    // SAFETY: buf holds at least len > s.len() bytes.
    unsafe {
        ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
        *buf.add(s.len()) = 0;
    }
    Ok(())
}

fn pct(v: f64) -> c_uint {
    v.round().clamp(0.0, 100.0) as c_uint
}

// ---------------------------------------------------------------------------------------------
// Library lifetime and system queries
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    let mut guard = lock();
    if let Some(st) = guard.as_mut()
        && st.init_count > 0
    {
        st.init_count += 1;
        return SUCCESS;
    }
    let Some(path) = script_path() else {
        eprintln!(
            "fake-nvml: {SCRIPT_ENV} is not set and there is no {SIBLING_SCRIPT} next to the library"
        );
        return nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED;
    };
    let script = match Script::load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake-nvml: {e}");
            return UNKNOWN;
        }
    };
    if let Some(code) = script.init_error {
        // Keep watching the file so clearing the fault lets a later init succeed.
        return code;
    }
    if script.gpus.len() > MAX_GPUS {
        eprintln!("fake-nvml: at most {MAX_GPUS} GPUs");
        return UNKNOWN;
    }
    let now = script::now_ms();
    let energy = vec![(0.0, now); script.gpus.len()];
    let prev = guard.take();
    *guard = Some(State {
        init_count: 1,
        file_id: file_id(&path),
        path,
        script,
        loaded_ms: prev.as_ref().map(|p| p.loaded_ms).unwrap_or(now),
        last_check: Instant::now(),
        energy,
        event_sets: HashMap::new(),
        gpm_samples: HashMap::new(),
        next_handle: prev.map(|p| p.next_handle).unwrap_or(0),
    });
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    nvmlInit_v2()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    let mut guard = lock();
    match guard.as_mut() {
        Some(st) if st.init_count > 0 => {
            st.init_count -= 1;
            if st.init_count == 0 {
                st.event_sets.clear();
                st.gpm_samples.clear();
            }
            SUCCESS
        }
        _ => UNINITIALIZED,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let s: &'static CStr = match result {
        0 => c"Success",
        1 => c"Uninitialized",
        2 => c"Invalid Argument",
        3 => c"Not Supported",
        6 => c"Not Found",
        7 => c"Insufficient Size",
        9 => c"Driver Not Loaded",
        10 => c"Timeout",
        15 => c"GPU is lost",
        25 => c"Argument version mismatch",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(buf: *mut c_char, len: c_uint) -> nvmlReturn_t {
    with_state(None, "nvmlSystemGetDriverVersion", |st, _| unsafe {
        out_str(buf, len, &st.script.driver_version)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(buf: *mut c_char, len: c_uint) -> nvmlReturn_t {
    with_state(None, "nvmlSystemGetNVMLVersion", |st, _| unsafe {
        out_str(buf, len, &st.script.nvml_version)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(v: *mut i32) -> nvmlReturn_t {
    with_state(None, "nvmlSystemGetCudaDriverVersion", |st, _| unsafe {
        out(v, st.script.cuda_driver_version)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(v: *mut i32) -> nvmlReturn_t {
    unsafe { nvmlSystemGetCudaDriverVersion(v) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    with_state(None, "nvmlDeviceGetCount_v2", |st, _| unsafe {
        out(count, st.script.gpus.len() as c_uint)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let mut guard = lock();
    let Some(st) = guard.as_mut().filter(|s| s.init_count > 0) else {
        return UNINITIALIZED;
    };
    st.refresh();
    let i = index as usize;
    if i >= st.script.gpus.len() {
        return INVALID_ARG;
    }
    if let Err(e) = st.fault(Some(i), "nvmlDeviceGetHandleByIndex_v2") {
        return e;
    }
    code(unsafe { out(device, (DEVICE_BASE + i) as nvmlDevice_t) })
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetIndex", |_, i| unsafe {
        out(index, i as c_uint)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    buf: *mut c_char,
    len: c_uint,
) -> nvmlReturn_t {
    if let Some((i, k)) = mig_handle(device) {
        return with_state(None, "nvmlDeviceGetUUID", |st, _| {
            let gpu = st.script.gpus.get(i).ok_or(INVALID_ARG)?;
            let uuid = format!("MIG-{}-{k}", gpu.uuid.trim_start_matches("GPU-"));
            unsafe { out_str(buf, len, &uuid) }
        });
    }
    with_state(Some(device), "nvmlDeviceGetUUID", |st, i| unsafe {
        out_str(buf, len, &st.script.gpus[i].uuid)
    })
}

/// GPU index and MIG index of a MIG device handle (see `nvmlDeviceGetMigDeviceHandleByIndex`).
fn mig_handle(device: nvmlDevice_t) -> Option<(usize, usize)> {
    let h = (device as usize).checked_sub(MIG_BASE)?;
    Some((h / 0x100, h % 0x100))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    buf: *mut c_char,
    len: c_uint,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetName", |st, i| unsafe {
        out_str(buf, len, &st.script.gpus[i].name)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetPciInfo_v3", |st, i| {
        if pci.is_null() {
            return Err(INVALID_ARG);
        }
        let id = &st.script.gpus[i].pci_bus_id;
        // "DDDDDDDD:BB:DD.F": parse what is there, leave the rest zero.
        let mut parts = id.split([':', '.']);
        let mut num = || {
            parts
                .next()
                .and_then(|p| u32::from_str_radix(p, 16).ok())
                .unwrap_or(0)
        };
        let (domain, bus, dev) = (num(), num(), num());
        // SAFETY: pci is a non-null pointer to an nvmlPciInfo_t.
        unsafe {
            let p = &mut *pci;
            p.domain = domain;
            p.bus = bus;
            p.device = dev;
            p.pciDeviceId = 0x2335_10de;
            p.pciSubSystemId = 0x18be_10de;
            let legacy: String = id.chars().skip(4).collect();
            out_str(p.busIdLegacy.as_mut_ptr(), 16, &legacy).or(Ok::<(), u32>(()))?;
            out_str(p.busId.as_mut_ptr(), 32, id)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Utilisation, memory, clocks, power, temperature, PCIe
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    util: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetUtilizationRates", |st, i| {
        let t = st.elapsed_ms();
        let g = &st.script.gpus[i];
        unsafe {
            out(
                util,
                nvmlUtilization_t {
                    gpu: pct(g.utilization.at(t)),
                    memory: pct(g.memory_utilization.at(t)),
                },
            )
        }
    })
}

fn memory(st: &State, i: usize) -> (u64, u64, u64, u64) {
    let g = &st.script.gpus[i];
    let total = g.memory_total;
    let reserved = g.memory_reserved.min(total);
    let used = (g.memory_used.at(st.elapsed_ms()).max(0.0) as u64).min(total - reserved);
    (total, reserved, total - reserved - used, used)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    mem: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetMemoryInfo_v2", |st, i| {
        if mem.is_null() {
            return Err(INVALID_ARG);
        }
        let expected = (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint;
        // SAFETY: non-null pointer to the caller's struct.
        let m = unsafe { &mut *mem };
        if m.version != expected {
            return Err(VERSION_MISMATCH);
        }
        let (total, reserved, free, used) = memory(st, i);
        m.total = total;
        m.reserved = reserved;
        m.free = free;
        m.used = used;
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    mem: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetMemoryInfo", |st, i| {
        let (total, reserved, free, used) = memory(st, i);
        // v1 reports reserved memory as used.
        unsafe {
            out(
                mem,
                nvmlMemory_t {
                    total,
                    free,
                    used: used + reserved,
                },
            )
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    kind: nvmlClockType_t,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetClockInfo", |st, i| {
        let t = st.elapsed_ms();
        let g = &st.script.gpus[i];
        let v = match kind {
            nvmlClockType_enum_NVML_CLOCK_GRAPHICS | nvmlClockType_enum_NVML_CLOCK_SM => {
                g.sm_clock_mhz.at(t)
            }
            nvmlClockType_enum_NVML_CLOCK_MEM => g.memory_clock_mhz.at(t),
            nvmlClockType_enum_NVML_CLOCK_VIDEO => 1755.0,
            _ => return Err(INVALID_ARG),
        };
        unsafe { out(clock, v.max(0.0) as c_uint) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    mw: *mut c_uint,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetPowerUsage", |st, i| {
        let t = st.elapsed_ms();
        unsafe { out(mw, st.script.gpus[i].power_mw.at(t).max(0.0) as c_uint) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: nvmlDevice_t,
    mw: *mut c_uint,
) -> nvmlReturn_t {
    with_state(
        Some(device),
        "nvmlDeviceGetEnforcedPowerLimit",
        |st, i| unsafe { out(mw, st.script.gpus[i].power_limit_mw) },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    mj: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_state(
        Some(device),
        "nvmlDeviceGetTotalEnergyConsumption",
        |st, i| {
            let t = st.elapsed_ms();
            let now = script::now_ms();
            let power = st.script.gpus[i].power_mw.at(t).max(0.0);
            let (acc, last) = &mut st.energy[i];
            *acc += power * now.saturating_sub(*last) as f64 / 1000.0;
            *last = now;
            let v = st.script.gpus[i].energy_mj + *acc as u64;
            unsafe { out(mj, v) }
        },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: nvmlTemperatureSensors_t,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetTemperature", |st, i| {
        if sensor != nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU {
            return Err(INVALID_ARG);
        }
        let t = st.elapsed_ms();
        unsafe {
            out(
                temp,
                st.script.gpus[i].temperature_c.at(t).max(0.0) as c_uint,
            )
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_state(
        Some(device),
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        |st, i| unsafe { out(reasons, st.script.gpus[i].throttle_reasons) },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    unsafe { nvmlDeviceGetCurrentClocksThrottleReasons(device, reasons) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPcieThroughput(
    device: nvmlDevice_t,
    counter: nvmlPcieUtilCounter_t,
    kbps: *mut c_uint,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetPcieThroughput", |st, i| {
        let t = st.elapsed_ms();
        let g = &st.script.gpus[i];
        let v = match counter {
            nvmlPcieUtilCounter_enum_NVML_PCIE_UTIL_TX_BYTES => g.pcie_tx_kbps.at(t),
            nvmlPcieUtilCounter_enum_NVML_PCIE_UTIL_RX_BYTES => g.pcie_rx_kbps.at(t),
            _ => return Err(INVALID_ARG),
        };
        unsafe { out(kbps, v.max(0.0) as c_uint) }
    })
}

// ---------------------------------------------------------------------------------------------
// Memory errors
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    kind: nvmlMemoryErrorType_t,
    counter: nvmlEccCounterType_t,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetTotalEccErrors", |st, i| {
        if counter >= nvmlEccCounterType_enum_NVML_ECC_COUNTER_TYPE_COUNT {
            return Err(INVALID_ARG);
        }
        let g = &st.script.gpus[i];
        let v = match kind {
            nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_CORRECTED => g.ecc_corrected,
            nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_UNCORRECTED => g.ecc_uncorrected,
            _ => return Err(INVALID_ARG),
        };
        unsafe { out(count, v) }
    })
}

fn retired(st: &State, i: usize, cause: nvmlPageRetirementCause_t) -> Result<u32, nvmlReturn_t> {
    let g = &st.script.gpus[i];
    match cause {
        nvmlPageRetirementCause_enum_NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS => {
            Ok(g.retired_pages_sbe)
        }
        nvmlPageRetirementCause_enum_NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR => {
            Ok(g.retired_pages_dbe)
        }
        _ => Err(INVALID_ARG),
    }
}

/// The insufficient-size protocol shared by the list calls: report the needed count when the
/// buffer is missing or short, otherwise fill `n` entries.
unsafe fn fill_list(
    count: *mut c_uint,
    have_buffer: bool,
    n: u32,
    mut fill: impl FnMut(usize),
) -> Result<(), nvmlReturn_t> {
    if count.is_null() {
        return Err(INVALID_ARG);
    }
    // SAFETY: non-null count pointer.
    let cap = unsafe { *count };
    unsafe { *count = n };
    if n == 0 {
        return Ok(());
    }
    if !have_buffer || cap < n {
        return Err(INSUFFICIENT_SIZE);
    }
    for k in 0..n as usize {
        fill(k);
    }
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: nvmlDevice_t,
    cause: nvmlPageRetirementCause_t,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetRetiredPages", |st, i| {
        let n = retired(st, i, cause)?;
        unsafe {
            fill_list(count, !addresses.is_null(), n, |k| {
                *addresses.add(k) = 0x1000_0000 + k as u64 * 0x1000;
            })
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages_v2(
    device: nvmlDevice_t,
    cause: nvmlPageRetirementCause_t,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetRetiredPages_v2", |st, i| {
        let n = retired(st, i, cause)?;
        let have = !addresses.is_null() && !timestamps.is_null();
        unsafe {
            fill_list(count, have, n, |k| {
                *addresses.add(k) = 0x1000_0000 + k as u64 * 0x1000;
                *timestamps.add(k) = 1_700_000_000 + k as u64;
            })
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: nvmlDevice_t,
    corr: *mut c_uint,
    unc: *mut c_uint,
    pending: *mut c_uint,
    failure: *mut c_uint,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetRemappedRows", |st, i| {
        let g = &st.script.gpus[i];
        unsafe {
            out(corr, g.remapped_correctable)?;
            out(unc, g.remapped_uncorrectable)?;
            out(pending, 0)?;
            out(failure, 0)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// MIG
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetMigMode", |st, i| {
        let m = st.script.gpus[i].mig_mode;
        unsafe {
            out(current, m)?;
            out(pending, m)
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetMaxMigDeviceCount", |st, i| {
        let n = if st.script.gpus[i].mig_mode == 1 {
            7
        } else {
            0
        };
        unsafe { out(count, n) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with_state(
        Some(device),
        "nvmlDeviceGetMigDeviceHandleByIndex",
        |st, i| {
            let g = &st.script.gpus[i];
            if g.mig_mode != 1 {
                return Err(INVALID_ARG);
            }
            if index >= 7 {
                return Err(INVALID_ARG);
            }
            if index >= g.mig_instances {
                return Err(NOT_FOUND);
            }
            unsafe { out(mig, (MIG_BASE + i * 0x100 + index as usize) as nvmlDevice_t) }
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    with_state(
        Some(device),
        "nvmlDeviceGetComputeRunningProcesses_v3",
        |st, i| {
            let t = st.elapsed_ms();
            let procs = &st.script.gpus[i].processes;
            unsafe {
                fill_list(count, !infos.is_null(), procs.len() as u32, |k| {
                    let p = &procs[k];
                    *infos.add(k) = nvmlProcessInfo_t {
                        pid: p.pid,
                        usedGpuMemory: p.memory_used.at(t).max(0.0) as u64,
                        gpuInstanceId: u32::MAX,
                        computeInstanceId: u32::MAX,
                    };
                })
            }
        },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    with_state(
        Some(device),
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
        |_, _| unsafe { fill_list(count, !infos.is_null(), 0, |_| {}) },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMPSComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    with_state(
        Some(device),
        "nvmlDeviceGetMPSComputeRunningProcesses_v3",
        |_, _| unsafe { fill_list(count, !infos.is_null(), 0, |_| {}) },
    )
}

/// One sample per scripted process, stamped at the current 100 ms boundary: NVML answers with the
/// samples newer than `last_seen` and `NVML_ERROR_NOT_FOUND` when there are none.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    samples: *mut nvmlProcessUtilizationSample_t,
    count: *mut c_uint,
    last_seen: c_ulonglong,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceGetProcessUtilization", |st, i| {
        let t = st.elapsed_ms();
        let stamp = script::now_us() / 100_000 * 100_000;
        let procs = &st.script.gpus[i].processes;
        let n = if stamp > last_seen {
            procs.len() as u32
        } else {
            0
        };
        if n == 0 {
            if !count.is_null() {
                unsafe { *count = 0 };
            }
            return Err(NOT_FOUND);
        }
        unsafe {
            fill_list(count, !samples.is_null(), n, |k| {
                let p = &procs[k];
                *samples.add(k) = nvmlProcessUtilizationSample_t {
                    pid: p.pid,
                    timeStamp: stamp,
                    smUtil: pct(p.sm_util.at(t)),
                    memUtil: pct(p.mem_util.at(t)),
                    encUtil: pct(p.enc_util.at(t)),
                    decUtil: pct(p.dec_util.at(t)),
                };
            })
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Events (XID)
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    with_state(None, "nvmlEventSetCreate", |st, _| {
        if set.is_null() {
            return Err(INVALID_ARG);
        }
        let h = st.new_handle(EVENT_SET_BASE);
        st.event_sets.insert(
            h,
            EventSet {
                registered: Vec::new(),
                delivered: BTreeSet::new(),
            },
        );
        unsafe { out(set, h as nvmlEventSet_t) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    types: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_state(
        Some(device),
        "nvmlDeviceGetSupportedEventTypes",
        |_, _| unsafe { out(types, nvmlEventTypeXidCriticalError as u64) },
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlDeviceRegisterEvents", |st, i| {
        if types & !(nvmlEventTypeXidCriticalError as u64) != 0 {
            return Err(NOT_SUPPORTED);
        }
        let Some(es) = st.event_sets.get_mut(&(set as usize)) else {
            return Err(INVALID_ARG);
        };
        es.registered.push((i, types));
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    let r = with_state(None, "nvmlEventSetWait_v2", |st, _| {
        if data.is_null() {
            return Err(INVALID_ARG);
        }
        let gpus = &st.script.gpus;
        let Some(es) = st.event_sets.get_mut(&(set as usize)) else {
            return Err(INVALID_ARG);
        };
        for &(i, types) in &es.registered {
            if types & nvmlEventTypeXidCriticalError as u64 == 0 {
                continue;
            }
            let Some(g) = gpus.get(i) else { continue };
            if let Some(x) = g.xids.iter().find(|x| !es.delivered.contains(&(i, x.seq))) {
                es.delivered.insert((i, x.seq));
                unsafe {
                    *data = nvmlEventData_t {
                        device: (DEVICE_BASE + i) as nvmlDevice_t,
                        eventType: nvmlEventTypeXidCriticalError as u64,
                        eventData: x.xid,
                        gpuInstanceId: u32::MAX,
                        computeInstanceId: u32::MAX,
                    };
                }
                return Ok(());
            }
        }
        Err(TIMEOUT)
    });
    if r == TIMEOUT && timeout_ms > 0 {
        // A blocking wait that found nothing: wait the caller's time (capped), like the driver.
        std::thread::sleep(Duration::from_millis(u64::from(timeout_ms).min(10_000)));
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    let mut guard = lock();
    let Some(st) = guard.as_mut().filter(|s| s.init_count > 0) else {
        return UNINITIALIZED;
    };
    match st.event_sets.remove(&(set as usize)) {
        Some(_) => SUCCESS,
        None => INVALID_ARG,
    }
}

// ---------------------------------------------------------------------------------------------
// GPM (Hopper and later)
// ---------------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(
    device: nvmlDevice_t,
    support: *mut nvmlGpmSupport_t,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlGpmQueryDeviceSupport", |st, i| {
        if support.is_null() {
            return Err(INVALID_ARG);
        }
        let s = unsafe { &mut *support };
        if s.version != NVML_GPM_SUPPORT_VERSION {
            return Err(VERSION_MISMATCH);
        }
        s.isSupportedDevice = u32::from(st.script.gpus[i].gpm.is_some());
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(sample: *mut nvmlGpmSample_t) -> nvmlReturn_t {
    with_state(None, "nvmlGpmSampleAlloc", |st, _| {
        if sample.is_null() {
            return Err(INVALID_ARG);
        }
        let h = st.new_handle(GPM_BASE);
        st.gpm_samples.insert(h, None);
        unsafe { out(sample, h as nvmlGpmSample_t) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleFree(sample: nvmlGpmSample_t) -> nvmlReturn_t {
    let mut guard = lock();
    let Some(st) = guard.as_mut().filter(|s| s.init_count > 0) else {
        return UNINITIALIZED;
    };
    match st.gpm_samples.remove(&(sample as usize)) {
        Some(_) => SUCCESS,
        None => INVALID_ARG,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleGet(
    device: nvmlDevice_t,
    sample: nvmlGpmSample_t,
) -> nvmlReturn_t {
    with_state(Some(device), "nvmlGpmSampleGet", |st, i| {
        if st.script.gpus[i].gpm.is_none() {
            return Err(NOT_SUPPORTED);
        }
        let Some(slot) = st.gpm_samples.get_mut(&(sample as usize)) else {
            return Err(INVALID_ARG);
        };
        *slot = Some((i, script::now_us()));
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmMetricsGet(req: *mut nvmlGpmMetricsGet_t) -> nvmlReturn_t {
    with_state(None, "nvmlGpmMetricsGet", |st, _| {
        if req.is_null() {
            return Err(INVALID_ARG);
        }
        let r = unsafe { &mut *req };
        if r.version != NVML_GPM_METRICS_GET_VERSION {
            return Err(VERSION_MISMATCH);
        }
        if r.numMetrics as usize > r.metrics.len() {
            return Err(INVALID_ARG);
        }
        let s1 = st.gpm_samples.get(&(r.sample1 as usize)).copied().flatten();
        let s2 = st.gpm_samples.get(&(r.sample2 as usize)).copied().flatten();
        let (Some((d1, t1)), Some((d2, t2))) = (s1, s2) else {
            return Err(INVALID_ARG);
        };
        if d1 != d2 || t2 <= t1 {
            return Err(INVALID_ARG);
        }
        let t = st.elapsed_ms();
        let Some(gpm) = st.script.gpus.get(d2).and_then(|g| g.gpm.as_ref()) else {
            return Err(NOT_SUPPORTED);
        };
        for m in r.metrics.iter_mut().take(r.numMetrics as usize) {
            let (v, short, long, unit): (Option<f64>, &'static CStr, &'static CStr, &'static CStr) =
                match m.metricId {
                    nvmlGpmMetricId_t_NVML_GPM_METRIC_SM_UTIL => {
                        (Some(gpm.sm_util.at(t)), c"sm_util", c"SM utilization", c"%")
                    }
                    nvmlGpmMetricId_t_NVML_GPM_METRIC_SM_OCCUPANCY => (
                        Some(gpm.sm_occupancy.at(t)),
                        c"sm_occupancy",
                        c"SM occupancy",
                        c"%",
                    ),
                    nvmlGpmMetricId_t_NVML_GPM_METRIC_ANY_TENSOR_UTIL => (
                        Some(gpm.tensor_util.at(t)),
                        c"any_tensor_util",
                        c"Any tensor pipe utilization",
                        c"%",
                    ),
                    nvmlGpmMetricId_t_NVML_GPM_METRIC_DRAM_BW_UTIL => (
                        Some(gpm.dram_bw_util.at(t)),
                        c"dram_bw_util",
                        c"DRAM bandwidth utilization",
                        c"%",
                    ),
                    _ => (None, c"", c"", c""),
                };
            m.metricInfo.shortName = short.as_ptr().cast_mut();
            m.metricInfo.longName = long.as_ptr().cast_mut();
            m.metricInfo.unit = unit.as_ptr().cast_mut();
            match v {
                Some(v) => {
                    m.value = v;
                    m.nvmlReturn = SUCCESS;
                }
                None => m.nvmlReturn = NOT_SUPPORTED,
            }
        }
        Ok(())
    })
}
