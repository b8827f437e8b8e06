//! The headroom agent as a library: samplers, history, policy, actuators and reporting, used by the
//! `headroom` binary and by integration tests and benchmarks.

pub mod sample;
