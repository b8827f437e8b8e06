//! Samplers: where bytes from procfs, cgroup files, NVML and eBPF maps enter the agent. Each
//! sampler turns its source into plain values once per interval; nothing here decides,
//! stores history or serves.

pub mod cgroup;
pub mod ebpf;
pub mod engines;
pub mod gpu;
pub mod node;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

/// Everything one sampling pass saw. Immutable once built; shared with scrapes and the API.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    #[serde(with = "unix_seconds")]
    pub at: SystemTime,
    pub node: Option<node::NodeSample>,
    pub containers: Vec<cgroup::ContainerSample>,
    /// Request latency and run-queue delay from the eBPF probes (empty when they are off).
    pub ebpf: ebpf::EbpfSnapshot,
    /// cgroup v2 id (what eBPF reports) of every tracked container that has a v2 directory.
    #[serde(skip)]
    pub cgroup_ids: BTreeMap<u64, Arc<cgroup::Identity>>,
    /// GPUs, their processes and containers; served through `/metrics`, not the JSON API.
    #[serde(skip)]
    pub gpu: gpu::GpuSnapshot,
    /// Cgroup paths of the containers that went since the previous pass.
    #[serde(skip)]
    pub gone: Vec<String>,
    /// Inference engines in tracked containers, as the engine worker last scraped them.
    pub engines: Arc<engines::EngineSnapshot>,
    /// Forecasts made from this sample, one per forecast series.
    pub forecasts: Vec<crate::forecast::ForecastRow>,
}

/// Time as float seconds since the epoch in JSON.
pub mod unix_seconds {
    use std::time::SystemTime;

    pub fn to_f64(t: SystemTime) -> f64 {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(to_f64(*t))
    }

    /// The same for an optional time (`null` when unset).
    pub mod option {
        use std::time::SystemTime;

        pub fn serialize<S: serde::Serializer>(
            t: &Option<SystemTime>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_some(&super::to_f64(*t)),
                None => s.serialize_none(),
            }
        }
    }
}
