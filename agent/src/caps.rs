//! What the agent may do, from its effective capabilities (`CapEff` in `/proc/self/status`), and
//! one log line per feature that will not work for want of one. The agent runs as an
//! unprivileged user with the few capabilities its unit grants (see `systemd/`); a feature
//! without what it needs is reported here once, at start-up, and the agent carries on without it.
//!
//! This module only reads and reports; it never changes the process's privileges.

use std::path::PathBuf;

use crate::config::Config;

/// Capability numbers from `linux/capability.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    DacOverride = 1,
    DacReadSearch = 2,
    SysAdmin = 21,
    Perfmon = 38,
    Bpf = 39,
}

impl Cap {
    pub fn name(self) -> &'static str {
        match self {
            Cap::DacOverride => "CAP_DAC_OVERRIDE",
            Cap::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }
}

/// The effective capability set of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps(u64);

impl Caps {
    /// Reads `/proc/self/status`; `None` if it cannot be read (then nothing is reported).
    pub fn current() -> Option<Caps> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        Caps::parse(&status)
    }

    pub fn parse(status: &str) -> Option<Caps> {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))?
            .trim();
        u64::from_str_radix(hex, 16).ok().map(Caps)
    }

    pub fn has(self, cap: Cap) -> bool {
        self.0 & (1u64 << cap as u32) != 0
    }

    /// Loading and attaching tracing eBPF programs: CAP_BPF with CAP_PERFMON, or CAP_SYS_ADMIN.
    pub fn ebpf_missing(self) -> Vec<Cap> {
        if self.has(Cap::SysAdmin) {
            return Vec::new();
        }
        [Cap::Bpf, Cap::Perfmon]
            .into_iter()
            .filter(|c| !self.has(*c))
            .collect()
    }
}

/// One line per feature that cannot work with `caps`; each says what is missing and what the
/// agent does without it. Pure, so it is tested with plain values.
pub fn missing(config: &Config, caps: Caps, unreadable: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    if config.ebpf.enabled {
        let m = caps.ebpf_missing();
        if !m.is_empty() {
            let names: Vec<&str> = m.iter().map(|c| c.name()).collect();
            out.push(format!(
                "eBPF probes need {} (or CAP_SYS_ADMIN), missing {}: request latency and run-queue \
                 delay will not be measured; grant them (AmbientCapabilities in the unit, \
                 securityContext.capabilities.add in a pod) or set ebpf.enabled = false",
                "CAP_BPF and CAP_PERFMON",
                names.join(" and ")
            ));
        }
    }
    for dir in unreadable {
        out.push(format!(
            "cannot read container runtime state in {} ({} missing): containers there are named \
             from their cgroup path only",
            dir.display(),
            Cap::DacReadSearch.name()
        ));
    }
    out
}

/// Runtime state directories that exist but cannot be listed by this process.
fn unreadable_dirs(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .filter(|d| d.is_dir() && std::fs::read_dir(d.as_path()).is_err())
        .cloned()
        .collect()
}

/// Logs, once, every feature the process lacks a capability for.
pub fn report(config: &Config) {
    let Some(caps) = Caps::current() else {
        return;
    };
    let unreadable = unreadable_dirs(&config.cgroup.runtime_state_dirs);
    for line in missing(config, caps, &unreadable) {
        tracing::warn!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let root = Caps::parse("Name:\tx\nCapEff:\t000001ffffffffff\n").unwrap();
        assert!(root.has(Cap::Bpf) && root.has(Cap::SysAdmin));
        assert!(root.ebpf_missing().is_empty());
        let none = Caps::parse("CapEff:\t0000000000000000\n").unwrap();
        assert_eq!(none.ebpf_missing(), vec![Cap::Bpf, Cap::Perfmon]);
        // CAP_BPF (39) and CAP_PERFMON (38) only, as the systemd unit grants.
        let unit = Caps::parse("CapEff:\t000000c000000006\n").unwrap();
        assert!(unit.ebpf_missing().is_empty());
        assert!(unit.has(Cap::DacOverride) && unit.has(Cap::DacReadSearch));
        assert!(!unit.has(Cap::SysAdmin));
        assert_eq!(Caps::parse("CapEff: zz\n"), None);
    }

    #[test]
    fn each_missing_feature_is_one_line_naming_the_capability() {
        let mut c = Config::default();
        let none = Caps(0);
        let lines = missing(&c, none, &[PathBuf::from("/run/runc")]);
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].contains("missing CAP_BPF and CAP_PERFMON"),
            "{}",
            lines[0]
        );
        assert!(lines[1].contains("CAP_DAC_READ_SEARCH") && lines[1].contains("/run/runc"));
        c.ebpf.enabled = false;
        assert!(missing(&c, none, &[]).is_empty());
    }
}
