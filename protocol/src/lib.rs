//! `headroom-protocol`: what the agent and the aggregator both speak, and nothing else. It owns
//! the versioned hint wire schema and the rules a report must pass (`schema`), how a forecast's
//! quantiles are read at any level (`quantile`), the agent-side sender that posts batches with
//! its on-disk spool (`client`) over HTTP or HTTPS (`tls`), and the SVG charts both status pages
//! draw (`chart`).
//!
//! It must never know how the agent measures or decides, nor how the aggregator merges: both
//! depend on this crate and never on each other, so a change to either side's insides cannot
//! change what goes over the wire.

pub mod chart;
pub mod client;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod quantile;
pub mod schema;
pub mod time;
pub mod tls;

pub use quantile::quantile_at;
pub use schema::{Hint, HintBatch, SCHEMA_V1};
pub use time::rfc3339;
