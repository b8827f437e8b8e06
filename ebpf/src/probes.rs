//! Loading the embedded object, attaching each probe group along a fallback chain of program
//! types, and reading its histogram maps. Owns every kernel object it creates: dropping [`Probes`]
//! detaches the links and closes programs and maps. Never panics and never fails the caller: what
//! the kernel refuses is recorded in [`ProgramStatus`] and logged once.

use std::collections::HashMap as StdHashMap;
use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use aya::maps::{Array, HashMap, Map, MapData};
use aya::programs::{BtfTracePoint, FEntry, FExit, Program, RawTracePoint};
use aya::{Btf, Ebpf, EbpfLoader, Pod};
use serde::{Deserialize, Serialize};

use crate::hist::{Histogram, NBUCKETS};

/// The compiled probes, rebuilt by `ebpf/build.sh`: the first keeps tp_btf state in socket/task
/// local storage (cheapest per event); the second uses hash maps only, for kernels that lack
/// those map types (the whole object fails to load there, maps being created up front).
pub(crate) static OBJECTS: [(&str, &[u8]); 2] = [
    (
        "local_storage",
        aya::include_bytes_aligned!("../bpf/headroom.bpf.o"),
    ),
    (
        "compat",
        aya::include_bytes_aligned!("../bpf/headroom_compat.bpf.o"),
    ),
];

/// A way of attaching a probe, in the order the default chain tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attach {
    /// BTF-typed tracepoint (`BPF_PROG_TYPE_TRACING`, `tp_btf`); the sock tracepoints need >= 6.3.
    TpBtf,
    /// fentry/fexit trampolines on kernel functions (>= 5.5, needs BTF and trampolines).
    Fentry,
    /// Raw tracepoint (>= 4.17), arguments read through probe-read helpers.
    RawTracepoint,
}

impl Attach {
    pub fn as_str(self) -> &'static str {
        match self {
            Attach::TpBtf => "tp_btf",
            Attach::Fentry => "fentry",
            Attach::RawTracepoint => "raw_tracepoint",
        }
    }
}

impl fmt::Display for Attach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The default fallback chain (ebpf/README.md has the figures per kernel). `tp_btf` is the
/// cheapest per event everywhere it was measured: typed arguments read with plain loads, socket
/// state in local storage. `fentry`/`fexit` are the only request-latency hooks on Linux 5.10 to
/// 6.2 (the sock tracepoints are 6.3+). `raw_tracepoint` measured about as costly per run as
/// `fexit` (whose trampoline `bpf_stats` does not count), serves only where the 6.3 tracepoints
/// exist but BTF programs are refused, and goes last: the 5.10 verifier flags its use of run-time
/// allocated hash maps in a tracing program as unsafe.
pub const DEFAULT_CHAIN: [Attach; 3] = [Attach::TpBtf, Attach::Fentry, Attach::RawTracepoint];

/// The probe groups, as named in status and in `headroom_ebpf_program_up{program}`.
pub const REQUEST_LATENCY: &str = "request_latency";
pub const RUNQUEUE_DELAY: &str = "runqueue_delay";

/// One hook of a group: the program's function name in the object and where it attaches.
#[derive(Clone, Copy)]
enum Hook {
    TpBtf {
        prog: &'static str,
        tracepoint: &'static str,
    },
    FEntry {
        prog: &'static str,
        function: &'static str,
    },
    FExit {
        prog: &'static str,
        function: &'static str,
    },
    Raw {
        prog: &'static str,
        tracepoint: &'static str,
    },
}

impl Hook {
    fn prog(self) -> &'static str {
        match self {
            Hook::TpBtf { prog, .. }
            | Hook::FEntry { prog, .. }
            | Hook::FExit { prog, .. }
            | Hook::Raw { prog, .. } => prog,
        }
    }
}

/// Hooks of a group for one way of attaching; `None` when that way has no equivalent hook.
fn hooks(group: &str, how: Attach) -> Option<&'static [Hook]> {
    const REQ_TP: &[Hook] = &[
        Hook::TpBtf {
            prog: "tp_sock_state",
            tracepoint: "inet_sock_set_state",
        },
        Hook::TpBtf {
            prog: "tp_sock_recv",
            tracepoint: "sock_recv_length",
        },
        Hook::TpBtf {
            prog: "tp_sock_send",
            tracepoint: "sock_send_length",
        },
    ];
    const REQ_FENTRY: &[Hook] = &[
        Hook::FEntry {
            prog: "fe_sock_state",
            function: "tcp_set_state",
        },
        Hook::FExit {
            prog: "fe_inet_recv",
            function: "inet_recvmsg",
        },
        Hook::FExit {
            prog: "fe_inet6_recv",
            function: "inet6_recvmsg",
        },
        Hook::FExit {
            prog: "fe_inet_send",
            function: "inet_sendmsg",
        },
        Hook::FExit {
            prog: "fe_inet6_send",
            function: "inet6_sendmsg",
        },
    ];
    const REQ_RAW: &[Hook] = &[
        Hook::Raw {
            prog: "raw_sock_state",
            tracepoint: "inet_sock_set_state",
        },
        Hook::Raw {
            prog: "raw_sock_recv",
            tracepoint: "sock_recv_length",
        },
        Hook::Raw {
            prog: "raw_sock_send",
            tracepoint: "sock_send_length",
        },
    ];
    const RUNQ_TP: &[Hook] = &[
        Hook::TpBtf {
            prog: "tp_sched_wakeup",
            tracepoint: "sched_wakeup",
        },
        Hook::TpBtf {
            prog: "tp_sched_wakeup_new",
            tracepoint: "sched_wakeup_new",
        },
        Hook::TpBtf {
            prog: "tp_sched_switch",
            tracepoint: "sched_switch",
        },
    ];
    const RUNQ_RAW: &[Hook] = &[
        Hook::Raw {
            prog: "raw_sched_wakeup",
            tracepoint: "sched_wakeup",
        },
        Hook::Raw {
            prog: "raw_sched_wakeup_new",
            tracepoint: "sched_wakeup_new",
        },
        Hook::Raw {
            prog: "raw_sched_switch",
            tracepoint: "sched_switch",
        },
    ];
    match (group, how) {
        (REQUEST_LATENCY, Attach::TpBtf) => Some(REQ_TP),
        (REQUEST_LATENCY, Attach::Fentry) => Some(REQ_FENTRY),
        (REQUEST_LATENCY, Attach::RawTracepoint) => Some(REQ_RAW),
        (RUNQUEUE_DELAY, Attach::TpBtf) => Some(RUNQ_TP),
        // The scheduler's switch path is not a traceable function; only tracepoints reach it.
        (RUNQUEUE_DELAY, Attach::Fentry) => None,
        (RUNQUEUE_DELAY, Attach::RawTracepoint) => Some(RUNQ_RAW),
        _ => None,
    }
}

/// Which probe groups to load and which ways of attaching to try, in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Options {
    pub request_latency: bool,
    pub runqueue_delay: bool,
    pub chain: Vec<Attach>,
    /// Skip the local-storage object and load the hash-map-only one (tests use it).
    pub compat_only: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            request_latency: true,
            runqueue_delay: true,
            chain: DEFAULT_CHAIN.to_vec(),
            compat_only: false,
        }
    }
}

/// What happened when one way of attaching was tried for one group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachAttempt {
    pub attach: Attach,
    /// `"attached"`, `"not applicable"`, or `"refused: <reason>"`.
    pub result: String,
}

/// Per-group outcome, reported in `/v1/status` and `headroom_ebpf_program_up`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProgramStatus {
    pub program: &'static str,
    /// The way it is attached, or `None` when it runs with none.
    pub attached: Option<Attach>,
    /// Every way tried, in order, until one worked.
    pub attempts: Vec<AttachAttempt>,
}

impl ProgramStatus {
    pub fn up(&self) -> bool {
        self.attached.is_some()
    }
}

/// Errors reading the probes' maps.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawReqKey {
    cgroup_id: u64,
    port: u16,
    pad: [u16; 3],
}
// SAFETY: repr(C), only integers, and no padding bytes (8 + 2 + 6).
unsafe impl Pod for RawReqKey {}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawHist {
    sum_ns: u64,
    buckets: [u64; NBUCKETS],
}
// SAFETY: repr(C), only u64 fields, no padding.
unsafe impl Pod for RawHist {}

impl From<&RawHist> for Histogram {
    fn from(r: &RawHist) -> Self {
        Histogram {
            count: r.buckets.iter().sum(),
            sum_ns: r.sum_ns,
            buckets: r.buckets.to_vec(),
        }
    }
}

/// Key of a request-latency histogram: the serving thread's cgroup (v2 id) and the local port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    pub cgroup_id: u64,
    pub port: u16,
}

/// One reading of every map; histograms are cumulative since the probes were loaded.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    pub request_latency: StdHashMap<RequestKey, Histogram>,
    pub runqueue_delay: StdHashMap<u64, Histogram>,
    /// Events lost because a histogram map was full: (request latency, run-queue delay).
    pub dropped: (u64, u64),
}

/// What stays of a loaded object once its programs are attached: the three maps user space
/// reads and the links that keep the programs attached (a link holds its program, and a program
/// its maps). aya's parsed object and the kernel BTF are dropped right after loading, so they
/// cost nothing while the agent runs.
pub(crate) struct Kernel {
    pub(crate) req_hist: Map,
    pub(crate) runq_hist: Map,
    pub(crate) dropped: Map,
    pub(crate) links: Vec<OwnedFd>,
    /// (name in the object, kernel program id) of every attached program.
    pub(crate) programs: Vec<(String, u32)>,
}

/// The loaded probes. Dropping it detaches every link, which releases the programs and maps.
pub struct Probes {
    pub(crate) kernel: Option<Kernel>,
    pub(crate) object: Option<&'static str>,
    pub(crate) status: Vec<ProgramStatus>,
}

impl fmt::Debug for Probes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probes")
            .field("object", &self.object)
            .field("status", &self.status)
            .finish()
    }
}

fn error_text(err: &dyn std::error::Error) -> String {
    let mut text = err
        .to_string()
        .trim_end()
        .trim_end_matches(" Verifier output:")
        .to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let line = s.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = s.source();
    }
    // Verifier logs can run to megabytes. Their first line names the call that failed and their
    // last lines why the verifier stopped (an early line such as "reg type unsupported for
    // arg#0" is only a note), so both ends are kept.
    const HEAD: usize = 160;
    const TAIL: usize = 360;
    if text.len() > HEAD + TAIL + 8 {
        let mut head = HEAD;
        while !text.is_char_boundary(head) {
            head -= 1;
        }
        let mut tail = text.len() - TAIL;
        while !text.is_char_boundary(tail) {
            tail += 1;
        }
        text = format!("{} … {}", &text[..head], &text[tail..]);
    }
    text.replace('\n', " | ")
}

fn attach_hook(ebpf: &mut Ebpf, hook: Hook, btf: Option<&Btf>) -> Result<OwnedFd, String> {
    let name = hook.prog();
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} is missing from the object"))?;
    let need_btf =
        || btf.ok_or_else(|| "kernel BTF (/sys/kernel/btf/vmlinux) unavailable".to_string());
    let fail = |what: &str, e: &dyn std::error::Error| format!("{what} {name}: {}", error_text(e));
    // aya loads (CO-RE relocations, attach BTF ids); the link is created here rather than by
    // aya's attach() so that it is a plain fd: it can outlive aya's object and cross a process.
    let tracepoint = match hook {
        Hook::TpBtf { tracepoint, .. } => {
            let p: &mut BtfTracePoint = program.try_into().map_err(|e| fail("type of", &e))?;
            p.load(tracepoint, need_btf()?)
                .map_err(|e| fail("load", &e))?;
            None
        }
        Hook::FEntry { function, .. } => {
            let p: &mut FEntry = program.try_into().map_err(|e| fail("type of", &e))?;
            p.load(function, need_btf()?)
                .map_err(|e| fail("load", &e))?;
            None
        }
        Hook::FExit { function, .. } => {
            let p: &mut FExit = program.try_into().map_err(|e| fail("type of", &e))?;
            p.load(function, need_btf()?)
                .map_err(|e| fail("load", &e))?;
            None
        }
        Hook::Raw { tracepoint, .. } => {
            let p: &mut RawTracePoint = program.try_into().map_err(|e| fail("type of", &e))?;
            p.load().map_err(|e| fail("load", &e))?;
            Some(tracepoint)
        }
    };
    let program: &Program = ebpf
        .program(name)
        .ok_or_else(|| format!("program {name} is missing from the object"))?;
    let prog_fd = program.fd().map_err(|e| fail("fd of", &e))?;
    raw_tracepoint_open(tracepoint, prog_fd.as_fd()).map_err(|e| format!("attach {name}: {e}"))
}

/// `BPF_RAW_TRACEPOINT_OPEN`: attaches a raw tracepoint program to `tracepoint`, or a tracing
/// program (tp_btf, fentry, fexit) to the target it was loaded for when `tracepoint` is `None`.
/// The returned fd is the attachment; closing it detaches.
fn raw_tracepoint_open(tracepoint: Option<&str>, prog: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
    #[repr(C)]
    struct RawTracepointAttr {
        name: u64,
        prog_fd: u32,
        _pad: u32,
        cookie: u64,
    }
    let name = tracepoint
        .map(CString::new)
        .transpose()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = RawTracepointAttr {
        name: name.as_ref().map_or(0, |n| n.as_ptr() as u64),
        prog_fd: prog.as_raw_fd() as u32,
        _pad: 0,
        cookie: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for this command and outlives the call; `name`
    // outlives it too. On success the kernel returns a new fd that nothing else owns.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_RAW_TRACEPOINT_OPEN,
            &attr as *const RawTracepointAttr,
            std::mem::size_of::<RawTracepointAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a successful BPF_RAW_TRACEPOINT_OPEN returns a fresh fd owned by the caller.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) })
}

/// Unloads (and so detaches) every program of `hooks`; used to undo a half-attached group.
fn release(ebpf: &mut Ebpf, hooks: &[Hook]) {
    for hook in hooks {
        let Some(program) = ebpf.program_mut(hook.prog()) else {
            continue;
        };
        // Unloading a program that never loaded fails with NotLoaded; nothing to undo then.
        let _ = match hook {
            Hook::TpBtf { .. } => <&mut BtfTracePoint>::try_from(program).map(|p| p.unload()),
            Hook::FEntry { .. } => <&mut FEntry>::try_from(program).map(|p| p.unload()),
            Hook::FExit { .. } => <&mut FExit>::try_from(program).map(|p| p.unload()),
            Hook::Raw { .. } => <&mut RawTracePoint>::try_from(program).map(|p| p.unload()),
        };
    }
}

fn attach_group(
    ebpf: &mut Ebpf,
    group: &'static str,
    chain: &[Attach],
    btf: Option<&Btf>,
    links: &mut Vec<OwnedFd>,
) -> ProgramStatus {
    let mut attempts = Vec::new();
    for &how in chain {
        let Some(group_hooks) = hooks(group, how) else {
            attempts.push(AttachAttempt {
                attach: how,
                result: "not applicable".into(),
            });
            continue;
        };
        let mut group_links = Vec::with_capacity(group_hooks.len());
        let outcome = group_hooks.iter().try_for_each(|&h| {
            group_links.push(attach_hook(ebpf, h, btf)?);
            Ok::<(), String>(())
        });
        match outcome {
            Ok(()) => {
                attempts.push(AttachAttempt {
                    attach: how,
                    result: "attached".into(),
                });
                links.append(&mut group_links);
                return ProgramStatus {
                    program: group,
                    attached: Some(how),
                    attempts,
                };
            }
            Err(reason) => {
                drop(group_links);
                release(ebpf, group_hooks);
                attempts.push(AttachAttempt {
                    attach: how,
                    result: format!("refused: {reason}"),
                });
            }
        }
    }
    ProgramStatus {
        program: group,
        attached: None,
        attempts,
    }
}

/// Logs the outcome once, wherever the loading ran (here or in a loader process).
pub(crate) fn log_outcome(object: Option<&str>, status: &[ProgramStatus]) {
    if let Some(object) = object {
        tracing::info!(object, "eBPF object loaded");
    }
    // What a kernel cannot do is named with the kernel, so a fleet's logs say which ones lack it.
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    for st in status {
        for attempt in &st.attempts {
            if let Some(reason) = attempt.result.strip_prefix("refused: ") {
                tracing::warn!(program = st.program, attach = %attempt.attach, %kernel, %reason, "eBPF program type refused; trying the next in the chain");
            }
        }
        match st.attached {
            Some(how) => {
                // The chain is ordered cheapest first (see DEFAULT_CHAIN); what was tried says
                // how far down this kernel sent the group.
                let tried = st
                    .attempts
                    .iter()
                    .map(|a| a.attach.as_str())
                    .collect::<Vec<_>>()
                    .join(" > ");
                tracing::info!(program = st.program, attach = %how, order = %tried, "eBPF program attached (attach types tried cheapest first)")
            }
            None => tracing::warn!(
                program = st.program,
                %kernel,
                "eBPF program not attached by any way in the chain; running without it"
            ),
        }
    }
}

/// The requested groups, by name.
fn groups(opts: &Options) -> Vec<&'static str> {
    [
        (opts.request_latency, REQUEST_LATENCY),
        (opts.runqueue_delay, RUNQUEUE_DELAY),
    ]
    .into_iter()
    .filter_map(|(on, g)| on.then_some(g))
    .collect()
}

/// Every group refused for one reason that stopped all of them (no object could load).
fn all_refused(opts: &Options, reason: &str) -> Vec<ProgramStatus> {
    groups(opts)
        .into_iter()
        .map(|g| ProgramStatus {
            program: g,
            attached: None,
            attempts: opts
                .chain
                .iter()
                .map(|&how| AttachAttempt {
                    attach: how,
                    result: format!("refused: {reason}"),
                })
                .collect(),
        })
        .collect()
}

impl Probes {
    /// Loads the object in this process and attaches the requested groups. Never fails:
    /// whatever the kernel refuses is logged once and reported by [`Probes::status`]. Parsing
    /// the kernel BTF for CO-RE costs tens of MiB for a moment; [`crate::loader`] does the same
    /// in a short-lived process so a long-running caller never holds that peak.
    pub fn load(opts: &Options) -> Probes {
        let probes = Probes::load_quietly(opts);
        log_outcome(probes.object, &probes.status);
        probes
    }

    /// [`Probes::load`] without logging: a loader process hands the outcome to its parent,
    /// which logs it.
    pub(crate) fn load_quietly(opts: &Options) -> Probes {
        let groups = groups(opts);
        if groups.is_empty() {
            return Probes {
                kernel: None,
                object: None,
                status: Vec::new(),
            };
        }
        let btf = Btf::from_sys_fs().ok();
        let mut failures = Vec::new();
        let mut loaded = None;
        for (name, bytes) in OBJECTS.iter().skip(usize::from(opts.compat_only)) {
            match EbpfLoader::new()
                .btf(btf.as_ref())
                // aya 0.14 has no wrapper for task/socket storage maps; the kernel creates them
                // all the same, and user space never reads them.
                .allow_unsupported_maps()
                .load(bytes)
            {
                Ok(ebpf) => {
                    loaded = Some((*name, ebpf));
                    break;
                }
                Err(e) => failures.push(format!("object {name}: {}", error_text(&e))),
            }
        }
        let Some((object, mut ebpf)) = loaded else {
            let reason = format!(
                "loading the object (maps, CO-RE relocations): {}",
                failures.join("; ")
            );
            return Probes {
                kernel: None,
                object: None,
                status: all_refused(opts, &reason),
            };
        };
        let mut links = Vec::new();
        let status: Vec<ProgramStatus> = groups
            .iter()
            .map(|&g| attach_group(&mut ebpf, g, &opts.chain, btf.as_ref(), &mut links))
            .collect();
        drop(btf);
        let programs = ebpf
            .programs()
            .filter_map(|(name, p)| p.info().ok().map(|i| (name.to_string(), i.id())))
            .collect();
        let maps = (
            ebpf.take_map("req_hist"),
            ebpf.take_map("runq_hist"),
            ebpf.take_map("dropped"),
        );
        let (Some(req_hist), Some(runq_hist), Some(dropped)) = maps else {
            return Probes {
                kernel: None,
                object: None,
                status: all_refused(opts, "the object lacks its histogram maps"),
            };
        };
        // Programs not attached are unloaded with the object; attached ones live in their links.
        drop(ebpf);
        Probes {
            kernel: Some(Kernel {
                req_hist,
                runq_hist,
                dropped,
                links,
                programs,
            }),
            object: Some(object),
            status,
        }
    }

    /// Which embedded object loaded (`"local_storage"` or `"compat"`), if any.
    pub fn object(&self) -> Option<&'static str> {
        self.object
    }

    /// Per-group outcome of [`Probes::load`].
    pub fn status(&self) -> &[ProgramStatus] {
        &self.status
    }

    /// Kernel ids of the programs attached (for `bpftool prog show id N`, and to check release
    /// on drop).
    pub fn program_ids(&self) -> Vec<u32> {
        self.kernel
            .iter()
            .flat_map(|k| k.programs.iter().map(|(_, id)| *id))
            .collect()
    }

    /// Deletes histograms from the kernel maps (keys of cgroups gone or idle), so the bounded maps
    /// keep room for new ones. A key seen again later starts from zero. Returns how many were
    /// deleted; keys already absent are not errors.
    pub fn forget(
        &mut self,
        requests: &[RequestKey],
        runqueue: &[u64],
    ) -> Result<usize, ReadError> {
        let Some(kernel) = &mut self.kernel else {
            return Ok(0);
        };
        let err = |map: &'static str| move |source| ReadError::Map { map, source };
        let mut deleted = 0;
        if !requests.is_empty() {
            let mut req: HashMap<&mut MapData, RawReqKey, RawHist> =
                HashMap::try_from(&mut kernel.req_hist).map_err(err("req_hist"))?;
            for k in requests {
                let raw = RawReqKey {
                    cgroup_id: k.cgroup_id,
                    port: k.port,
                    pad: [0; 3],
                };
                deleted += usize::from(req.remove(&raw).is_ok());
            }
        }
        if !runqueue.is_empty() {
            let mut runq: HashMap<&mut MapData, u64, RawHist> =
                HashMap::try_from(&mut kernel.runq_hist).map_err(err("runq_hist"))?;
            for id in runqueue {
                deleted += usize::from(runq.remove(id).is_ok());
            }
        }
        Ok(deleted)
    }

    /// Kernel run-time accounting per attached program: (name, total run time, runs). The kernel
    /// counts only while `kernel.bpf_stats_enabled` is 1 (it costs a clock read per run), so
    /// benchmarks switch it on for a measuring run; otherwise both stay 0.
    pub fn program_stats(&self) -> Vec<(String, std::time::Duration, u64)> {
        let Some(kernel) = &self.kernel else {
            return Vec::new();
        };
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter_map(|info| {
                let (name, _) = kernel.programs.iter().find(|(_, id)| *id == info.id())?;
                Some((name.clone(), info.run_time(), info.run_count()))
            })
            .collect()
    }

    /// Reads every histogram. Cheap enough for each sampling tick: one map walk per key in use.
    pub fn read(&self) -> Result<Reading, ReadError> {
        let Some(kernel) = &self.kernel else {
            return Ok(Reading::default());
        };
        let err = |map: &'static str| move |source| ReadError::Map { map, source };

        let mut reading = Reading::default();
        let req: HashMap<&MapData, RawReqKey, RawHist> =
            HashMap::try_from(&kernel.req_hist).map_err(err("req_hist"))?;
        for entry in req.iter() {
            let (k, v) = entry.map_err(err("req_hist"))?;
            reading.request_latency.insert(
                RequestKey {
                    cgroup_id: k.cgroup_id,
                    port: k.port,
                },
                Histogram::from(&v),
            );
        }
        let runq: HashMap<&MapData, u64, RawHist> =
            HashMap::try_from(&kernel.runq_hist).map_err(err("runq_hist"))?;
        for entry in runq.iter() {
            let (k, v) = entry.map_err(err("runq_hist"))?;
            reading.runqueue_delay.insert(k, Histogram::from(&v));
        }
        let dropped: Array<&MapData, u64> =
            Array::try_from(&kernel.dropped).map_err(err("dropped"))?;
        reading.dropped = (
            dropped.get(&0, 0).map_err(err("dropped"))?,
            dropped.get(&1, 0).map_err(err("dropped"))?,
        );
        Ok(reading)
    }
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug)]
    struct Text(String);
    impl std::fmt::Display for Text {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Text {}

    #[test]
    fn a_long_verifier_log_keeps_its_first_note_and_its_verdict() {
        let mut log = String::from(
            "the BPF_PROG_LOAD syscall failed. Verifier output: reg type unsupported for arg#0\n",
        );
        for i in 0..2000 {
            log.push_str(&format!("{i}: (b7) r2 = 24 ; R2_w=24\n"));
        }
        log.push_str("R1 unbounded memory access, make sure to bounds check any such access\n");
        log.push_str("processed 910 insns (limit 1000000)");
        let text = error_text(&Text(log));
        assert!(text.len() < 600, "{} bytes", text.len());
        assert!(
            text.starts_with("the BPF_PROG_LOAD syscall failed"),
            "{text}"
        );
        assert!(text.contains("R1 unbounded memory access"), "{text}");
        assert!(
            text.ends_with("processed 910 insns (limit 1000000)"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn a_short_error_is_kept_whole() {
        let text = error_text(&Text("no such program\nsecond line".into()));
        assert_eq!(text, "no such program | second line");
    }
}
