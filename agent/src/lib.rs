//! `headroom-agent`: the node agent for GPU clusters, as a library the `headroom` binary runs.
//!
//! Data flows one way: samplers ([`sample`]) read the node, its containers and GPUs; each pass
//! becomes a [`sample::Snapshot`] that goes into the bounded [`history`] and is served by
//! [`serve`] ([`report::metrics`] encodes it for Prometheus at scrape time). [`state`] keeps the
//! history across restarts. The agent's loop lives in [`agent`]; what it shares with the server
//! and the reporters, in [`shared`]. The cgroup files themselves (names, formats, v1 against
//! v2) are [`cgroup_files`], which the container sampler reads through and the actuators
//! ([`act`]) plan their writes with.
//!
//! Nothing in this crate writes a cgroup file it was not told to manage. It never depends on the
//! aggregator: what the two say to each other (hint schema, validation, the hint client) lives in
//! `headroom-protocol`, and only the binary links both.

pub mod act;
pub mod agent;
pub mod backtest;
pub mod caps;
pub mod cgroup_files;
pub mod config;
pub mod forecast;
pub mod history;
pub mod kube;
pub mod notify;
pub mod policy;
pub mod report;
pub mod sample;
pub mod serve;
pub mod shared;
pub mod state;
