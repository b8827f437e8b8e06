//! Merging node reports into per-workload views: the registry of what each node last said,
//! replay detection by sequence number, expiry of silent nodes, and desired replicas at a risk level.
//!
//! Everything here is pure: time comes in as an argument and nothing is read or written outside
//! the values passed in, so the scaling arithmetic is tested with plain numbers. It must never
//! block, log, or reach the network. The one thing it shares is each workload's [`Answer`], an
//! atomic cell it rewrites after every change so that readers on other threads never wait for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use headroom_protocol::quantile_at;
use headroom_protocol::schema::{Hint, HintBatch, Resource, WorkloadRef};

/// Knobs of the merge arithmetic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergePolicy {
    /// Accepted probability that demand exceeds what the desired replicas provide; the demand used
    /// is the forecast quantile at `1 - risk`.
    pub risk: f64,
    /// Resources whose merged confidence falls below this keep their current replicas.
    pub min_confidence: f64,
    /// Nodes silent for longer than this (seconds) drop out of every view.
    pub node_ttl_s: f64,
}

impl Default for MergePolicy {
    fn default() -> Self {
        MergePolicy {
            risk: 0.1,
            min_confidence: 0.5,
            node_ttl_s: 30.0,
        }
    }
}

/// Merged view of one resource of one workload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourceView {
    pub resource: Resource,
    pub unit: &'static str,
    pub replicas: u64,
    pub capacity: f64,
    pub usage: f64,
    /// Forecast demand at probability `1 - risk`, summed over nodes. Summing per-node quantiles
    /// over-states the quantile of the sum unless nodes move together, which errs on the safe side.
    pub demand: f64,
    pub local_headroom: f64,
    pub desired_capacity: f64,
    /// Sum of the nodes' own replica deltas, for comparison with `desired_replicas`.
    pub node_replica_delta: f64,
    /// Capacity-weighted mean of node confidences (plain mean when no capacity is held).
    pub confidence: f64,
    pub desired_replicas: u64,
}

/// Merged view of one workload across all nodes that report it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadView {
    pub id: String,
    pub namespace: String,
    pub kind: String,
    pub name: String,
    pub nodes: usize,
    pub current_replicas: u64,
    /// Replicas needed at the configured risk: the most any resource needs.
    pub desired_replicas: u64,
    /// True when any demand is foreseen; the KEDA scaler's IsActive.
    pub active: bool,
    pub resources: Vec<ResourceView>,
    /// Distinct reasons the nodes gave, most frequent first (at most five).
    pub reasons: Vec<String>,
}

/// Desired replicas for one resource: the forecast demand divided by what one replica can hold
/// once the nodes' own headroom is used.
pub fn desired_replicas(
    replicas: u64,
    capacity: f64,
    local_headroom: f64,
    demand: f64,
    confidence: f64,
    policy: &MergePolicy,
) -> u64 {
    if confidence < policy.min_confidence {
        return replicas;
    }
    if demand <= 0.0 {
        return 0;
    }
    let absorbable = capacity + local_headroom;
    if replicas == 0 || absorbable <= 0.0 {
        // No replica to measure a per-replica size on: one is the least that can serve demand.
        return replicas.max(1);
    }
    let per_replica = absorbable / replicas as f64;
    // A relative epsilon keeps exact fits (demand == n * per_replica) from rounding up by one.
    let raw = demand / per_replica;
    let n = (raw - raw * 1e-9).ceil();
    if n >= u64::MAX as f64 {
        u64::MAX
    } else {
        n.max(1.0) as u64
    }
}

/// Running sums of one resource of one workload. Hints are added when a node reports them and
/// subtracted when the node's next batch replaces them, so reading a view costs O(resources)
/// however many nodes report the workload.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sums {
    replicas: i64,
    capacity: f64,
    usage: f64,
    demand: f64,
    headroom: f64,
    desired_capacity: f64,
    delta: f64,
    conf_weighted: f64,
    conf_plain: f64,
    n: i64,
}

impl Sums {
    /// Adds (`sign` = 1.0) or removes (`sign` = -1.0) one hint; `q` is the risk quantile.
    fn add(&mut self, h: &Hint, q: f64, sign: f64) {
        let s = sign as i64;
        self.replicas += s * i64::from(h.replicas);
        self.capacity += sign * h.capacity;
        self.usage += sign * h.usage;
        self.demand += sign * quantile_at(&h.forecast.quantiles, q);
        self.headroom += sign * h.local_headroom;
        self.desired_capacity += sign * h.desired_capacity;
        self.delta += sign * h.replica_delta;
        self.conf_weighted += sign * h.confidence * h.capacity;
        self.conf_plain += sign * h.confidence;
        self.n += s;
    }

    /// Replicas, capacity, headroom, demand and confidence as the views report them.
    fn figures(&self) -> (u64, f64, f64, f64, f64) {
        // Subtraction can leave rounding dust; nothing summed here is negative in truth.
        let capacity = pos(self.capacity);
        let confidence = if capacity > 0.0 {
            (self.conf_weighted / capacity).clamp(0.0, 1.0)
        } else if self.n > 0 {
            (self.conf_plain / self.n as f64).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let replicas = self.replicas.max(0) as u64;
        (
            replicas,
            capacity,
            pos(self.headroom),
            pos(self.demand),
            confidence,
        )
    }

    fn desired(&self, policy: &MergePolicy) -> u64 {
        let (replicas, capacity, headroom, demand, confidence) = self.figures();
        desired_replicas(replicas, capacity, headroom, demand, confidence, policy)
    }

    fn view(&self, resource: Resource, policy: &MergePolicy) -> ResourceView {
        let (replicas, capacity, headroom, demand, confidence) = self.figures();
        ResourceView {
            resource,
            unit: resource.unit(),
            replicas,
            capacity,
            usage: pos(self.usage),
            demand,
            local_headroom: headroom,
            desired_capacity: pos(self.desired_capacity),
            node_replica_delta: self.delta,
            confidence,
            desired_replicas: desired_replicas(
                replicas, capacity, headroom, demand, confidence, policy,
            ),
        }
    }
}

fn pos(v: f64) -> f64 {
    if v < 0.0 { 0.0 } else { v }
}

/// Whether `r` drives a workload's replicas: GPU utilisation does not where the workload reports
/// inference-engine signals (a loaded model keeps a GPU busy whatever the load).
fn drives(r: Resource, sums: &BTreeMap<Resource, Sums>) -> bool {
    r != Resource::Gpu || !sums.iter().any(|(e, s)| e.is_engine() && s.n > 0)
}

/// Desired replicas of a workload: the most any of its driving resources needs.
fn workload_desired(sums: &BTreeMap<Resource, Sums>, policy: &MergePolicy) -> u64 {
    sums.iter()
        .filter(|(r, s)| s.n > 0 && drives(**r, sums))
        .map(|(_, s)| s.desired(policy))
        .max()
        .unwrap_or(0)
}

fn build_view(
    workload: &WorkloadRef,
    nodes: usize,
    sums: &BTreeMap<Resource, Sums>,
    reasons: &HashMap<String, usize>,
    policy: &MergePolicy,
) -> WorkloadView {
    let resources: Vec<ResourceView> = sums
        .iter()
        .filter(|(_, s)| s.n > 0)
        .map(|(r, s)| s.view(*r, policy))
        .collect();
    let current_replicas = resources.iter().map(|r| r.replicas).max().unwrap_or(0);
    let desired = resources
        .iter()
        .filter(|r| drives(r.resource, sums))
        .map(|r| r.desired_replicas)
        .max()
        .unwrap_or(0);
    let mut top: Vec<(&String, &usize)> = reasons.iter().filter(|(_, n)| **n > 0).collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    WorkloadView {
        id: workload.id(),
        namespace: workload.namespace.clone(),
        kind: workload.kind.clone(),
        name: workload.name.clone(),
        nodes,
        current_replicas,
        desired_replicas: desired,
        active: desired > 0,
        resources,
        reasons: top.into_iter().take(5).map(|(r, _)| r.clone()).collect(),
    }
}

/// Merges the hints of every node for one workload from scratch. `hints` yields `(node, hint)`.
/// The registry keeps the same sums incrementally; this is the reference it is tested against.
pub fn merge_workload<'a>(
    workload: &WorkloadRef,
    hints: impl IntoIterator<Item = (&'a str, &'a Hint)>,
    policy: &MergePolicy,
) -> WorkloadView {
    let q = 1.0 - policy.risk;
    let mut sums: BTreeMap<Resource, Sums> = BTreeMap::new();
    let mut nodes: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for (node, h) in hints {
        nodes.insert(node);
        sums.entry(h.resource).or_default().add(h, q, 1.0);
        if !h.reason.is_empty() {
            *reasons.entry(h.reason.clone()).or_default() += 1;
        }
    }
    build_view(workload, nodes.len(), &sums, &reasons, policy)
}

/// What happened to a batch offered to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The batch replaced the node's previous state.
    Accepted { hints: usize },
    /// `seq` was not above the last accepted one in this epoch: a replay, acknowledged, not applied.
    Duplicate { last_seq: u64 },
}

#[derive(Debug, Clone)]
struct NodeEntry {
    epoch: u64,
    seq: u64,
    last_seen: f64,
    batch_time: f64,
    interval_s: f64,
    workloads: Vec<String>,
}

/// Node summary for `/v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    pub node: String,
    pub epoch: u64,
    pub seq: u64,
    /// Seconds since the aggregator last accepted a batch from the node.
    pub age_s: f64,
    /// Unix time the agent stamped on its last batch.
    pub batch_time: f64,
    pub interval_s: f64,
    pub workloads: usize,
}

/// The scaler's answer for one workload: its desired replicas (active when above zero). The
/// registry rewrites it after every change to the workload, so a reader on another thread loads
/// the current value without taking the registry's lock.
#[derive(Debug, Default)]
pub struct Answer {
    desired: AtomicU64,
}

impl Answer {
    pub fn desired_replicas(&self) -> u64 {
        self.desired.load(Ordering::Acquire)
    }

    /// True when any demand is foreseen, as [`WorkloadView::active`].
    pub fn active(&self) -> bool {
        self.desired_replicas() > 0
    }

    /// An answer that no longer changes: a silent workload's last one.
    pub fn fixed(desired: u64) -> Arc<Answer> {
        let a = Answer::default();
        a.set(desired);
        Arc::new(a)
    }

    fn set(&self, v: u64) {
        self.desired.store(v, Ordering::Release);
    }
}

/// A workload appearing in or leaving the registry, for whoever keeps an index of answers.
#[derive(Debug, Clone)]
pub enum IndexChange {
    Added(String, Arc<Answer>),
    /// With the desired replicas it had before it left.
    Removed(String, u64),
}

#[derive(Debug, Default)]
struct WorkloadEntry {
    key: Option<WorkloadRef>,
    /// node -> that node's hints for this workload (one per resource).
    nodes: BTreeMap<String, Vec<Hint>>,
    sums: BTreeMap<Resource, Sums>,
    reasons: HashMap<String, usize>,
    /// Updates since the sums were last recomputed from the hints.
    updates: u32,
    answer: Arc<Answer>,
}

/// Recomputing the running sums this often bounds floating-point drift from add/subtract cycles
/// at an amortized cost of one hint per update.
const RESYNC_EVERY: u32 = 4096;

impl WorkloadEntry {
    fn resync(&mut self, q: f64) {
        self.sums.clear();
        for h in self.nodes.values().flatten() {
            self.sums.entry(h.resource).or_default().add(h, q, 1.0);
        }
        self.updates = 0;
    }

    fn publish(&self, policy: &MergePolicy) {
        self.answer.set(workload_desired(&self.sums, policy));
    }
}

/// Soft state: the last batch of every live node, indexed by workload, with running per-workload
/// sums. `now` is any monotonic clock in seconds chosen by the caller.
#[derive(Debug)]
pub struct Registry {
    policy: MergePolicy,
    nodes: HashMap<String, NodeEntry>,
    workloads: HashMap<String, WorkloadEntry>,
    /// Workloads added or removed since the last `take_index_changes`, in order.
    index_changes: Vec<IndexChange>,
}

impl Registry {
    pub fn new(policy: MergePolicy) -> Self {
        Registry {
            policy,
            nodes: HashMap::new(),
            workloads: HashMap::new(),
            index_changes: Vec::new(),
        }
    }

    pub fn policy(&self) -> &MergePolicy {
        &self.policy
    }

    fn q(&self) -> f64 {
        1.0 - self.policy.risk
    }

    /// Applies a validated batch unless it is a replay.
    pub fn apply(&mut self, batch: HintBatch, now: f64) -> Applied {
        if let Some(prev) = self.nodes.get(&batch.node)
            && prev.epoch == batch.epoch
            && batch.seq <= prev.seq
        {
            return Applied::Duplicate { last_seq: prev.seq };
        }
        // Workloads the node's previous batch touched stay in place while empty, so one that the
        // new batch reports again is updated, not removed and re-created.
        let previous = self.take_node_hints(&batch.node);
        let q = self.q();
        let count = batch.hints.len();
        let mut ids: Vec<String> = Vec::new();
        for h in batch.hints {
            let id = h.workload.id();
            let entry = match self.workloads.get_mut(&id) {
                Some(e) => e,
                None => {
                    let e = self.workloads.entry(id.clone()).or_default();
                    self.index_changes
                        .push(IndexChange::Added(id.clone(), e.answer.clone()));
                    e
                }
            };
            if entry.key.is_none() {
                entry.key = Some(h.workload.clone());
            }
            entry.sums.entry(h.resource).or_default().add(&h, q, 1.0);
            if !h.reason.is_empty() {
                match entry.reasons.get_mut(&h.reason) {
                    Some(n) => *n += 1,
                    None => {
                        entry.reasons.insert(h.reason.clone(), 1);
                    }
                }
            }
            match entry.nodes.get_mut(&batch.node) {
                Some(v) => v.push(h),
                None => {
                    entry.nodes.insert(batch.node.clone(), vec![h]);
                }
            }
            // After the hint is stored, so a resync counts it exactly once.
            entry.updates += 1;
            if entry.updates >= RESYNC_EVERY {
                entry.resync(q);
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        for id in previous.iter().chain(&ids) {
            self.settle(id);
        }
        self.nodes.insert(
            batch.node,
            NodeEntry {
                epoch: batch.epoch,
                seq: batch.seq,
                last_seen: now,
                batch_time: batch.time,
                interval_s: batch.interval_s,
                workloads: ids,
            },
        );
        Applied::Accepted { hints: count }
    }

    /// Removes a node and settles the workloads it reported.
    fn remove_node(&mut self, node: &str) {
        for id in self.take_node_hints(node) {
            self.settle(&id);
        }
    }

    /// Removes a node's hints from every workload it reported, leaving empty workloads in place;
    /// returns those workloads' ids for `settle`.
    fn take_node_hints(&mut self, node: &str) -> Vec<String> {
        let Some(prev) = self.nodes.remove(node) else {
            return Vec::new();
        };
        let q = self.q();
        for id in &prev.workloads {
            let Some(w) = self.workloads.get_mut(id) else {
                continue;
            };
            if let Some(hints) = w.nodes.remove(node) {
                for h in &hints {
                    if let Some(s) = w.sums.get_mut(&h.resource) {
                        s.add(h, q, -1.0);
                        if s.n <= 0 {
                            w.sums.remove(&h.resource);
                        }
                    }
                    if let Some(n) = w.reasons.get_mut(&h.reason) {
                        *n -= 1;
                        if *n == 0 {
                            w.reasons.remove(&h.reason);
                        }
                    }
                }
                w.updates += hints.len() as u32;
            }
        }
        prev.workloads
    }

    /// After a change to workload `id`: drops it if no node reports it any more, else publishes
    /// its new answer.
    fn settle(&mut self, id: &str) {
        let Some(w) = self.workloads.get(id) else {
            return;
        };
        if w.nodes.is_empty() {
            // Readers still holding the cell see zero: no node, no demand.
            let last = w.answer.desired_replicas();
            w.answer.set(0);
            self.workloads.remove(id);
            self.index_changes
                .push(IndexChange::Removed(id.to_owned(), last));
        } else {
            w.publish(&self.policy);
        }
    }

    /// Workloads added or removed since the last call, in the order it happened.
    pub fn take_index_changes(&mut self) -> Vec<IndexChange> {
        std::mem::take(&mut self.index_changes)
    }

    /// The published answer cell of one workload.
    pub fn answer(&self, id: &str) -> Option<Arc<Answer>> {
        self.workloads.get(id).map(|w| w.answer.clone())
    }

    /// Drops nodes silent for longer than the TTL; returns how many were dropped.
    pub fn expire(&mut self, now: f64, ttl_s: f64) -> usize {
        let stale: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| now - n.last_seen > ttl_s)
            .map(|(k, _)| k.clone())
            .collect();
        for n in &stale {
            self.remove_node(n);
        }
        stale.len()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    /// The merged view of one workload, O(resources + reasons) regardless of node count.
    pub fn workload(&self, id: &str) -> Option<WorkloadView> {
        let w = self.workloads.get(id)?;
        let key = w.key.as_ref()?;
        Some(build_view(
            key,
            w.nodes.len(),
            &w.sums,
            &w.reasons,
            &self.policy,
        ))
    }

    /// The same view recomputed from every stored hint; for checking the running sums.
    pub fn workload_from_scratch(&self, id: &str) -> Option<WorkloadView> {
        let w = self.workloads.get(id)?;
        let key = w.key.as_ref()?;
        Some(merge_workload(
            key,
            w.nodes
                .iter()
                .flat_map(|(n, hs)| hs.iter().map(move |h| (n.as_str(), h))),
            &self.policy,
        ))
    }

    /// Ids of every workload, unordered, without building views.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.workloads.keys().map(String::as_str)
    }

    /// All workloads, sorted by id.
    pub fn workloads(&self) -> Vec<WorkloadView> {
        let mut ids: Vec<&String> = self.workloads.keys().collect();
        ids.sort();
        ids.into_iter().filter_map(|id| self.workload(id)).collect()
    }

    /// All live nodes, sorted by name.
    pub fn nodes(&self, now: f64) -> Vec<NodeView> {
        let mut v: Vec<NodeView> = self
            .nodes
            .iter()
            .map(|(name, n)| NodeView {
                node: name.clone(),
                epoch: n.epoch,
                seq: n.seq,
                age_s: (now - n.last_seen).max(0.0),
                batch_time: n.batch_time,
                interval_s: n.interval_s,
                workloads: n.workloads.len(),
            })
            .collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_protocol::fixtures::{batch, hint};

    fn policy() -> MergePolicy {
        MergePolicy {
            risk: 0.1,
            min_confidence: 0.5,
            node_ttl_s: 30.0,
        }
    }

    #[test]
    fn desired_replicas_uses_headroom_and_exact_fits() {
        let p = policy();
        // 3 replicas hold 6 cores (2 each): demand 6 fits exactly, 6.1 needs a fourth.
        assert_eq!(desired_replicas(3, 6.0, 0.0, 6.0, 1.0, &p), 3);
        assert_eq!(desired_replicas(3, 6.0, 0.0, 6.1, 1.0, &p), 4);
        // With 3 cores of node headroom each replica can grow to 3 cores: 9 fits in 3.
        assert_eq!(desired_replicas(3, 6.0, 3.0, 9.0, 1.0, &p), 3);
        // No demand: scale to zero; low confidence: keep what runs.
        assert_eq!(desired_replicas(3, 6.0, 0.0, 0.0, 1.0, &p), 0);
        assert_eq!(desired_replicas(3, 6.0, 0.0, 60.0, 0.2, &p), 3);
        // Nothing running yet but demand foreseen: start one.
        assert_eq!(desired_replicas(0, 0.0, 0.0, 5.0, 1.0, &p), 1);
    }

    #[test]
    fn engine_signals_take_replica_advice_from_gpu_utilisation() {
        let mut r = Registry::new(policy());
        // One replica per node; capacities are replicas × per-replica targets: 4 waiting
        // requests, a KV cache 80 % full, 100 tokens/s. A GPU forecast of 1.5 GPUs per replica
        // (a loaded model keeps the GPU busy) would ask for 2 replicas per node.
        let node = |seq, waiting, kv, tokens| {
            batch(
                "a",
                seq,
                vec![
                    hint("ml", "llm", Resource::Gpu, 1.0, 1.5),
                    hint("ml", "llm", Resource::EngineQueue, 4.0, waiting),
                    hint("ml", "llm", Resource::EngineKvCache, 0.8, kv),
                    hint("ml", "llm", Resource::EngineTokens, 100.0, tokens),
                ],
            )
        };
        r.apply(node(1, 2.0, 0.5, 60.0), 0.0);
        let v = r.workload("ml/Deployment/llm").unwrap();
        // Quiet engine: one replica, whatever the GPU says.
        assert_eq!(v.desired_replicas, 1);
        let gpu = v
            .resources
            .iter()
            .find(|x| x.resource == Resource::Gpu)
            .unwrap();
        assert_eq!(gpu.desired_replicas, 2, "GPU still reported, not driving");
        assert_eq!(r.answer("ml/Deployment/llm").unwrap().desired_replicas(), 1);
        // 9 waiting over a target of 4 per replica: 3 replicas.
        r.apply(node(2, 9.0, 0.5, 60.0), 0.0);
        assert_eq!(r.workload("ml/Deployment/llm").unwrap().desired_replicas, 3);
        // A KV cache forecast 1.7 full over 0.8 per replica: 3; tokens 450/s over 100: 5.
        r.apply(node(3, 0.0, 1.7, 60.0), 0.0);
        assert_eq!(r.workload("ml/Deployment/llm").unwrap().desired_replicas, 3);
        r.apply(node(4, 0.0, 0.1, 450.0), 0.0);
        assert_eq!(r.workload("ml/Deployment/llm").unwrap().desired_replicas, 5);
        assert_eq!(r.answer("ml/Deployment/llm").unwrap().desired_replicas(), 5);
        // Without engine signals GPU utilisation drives as before.
        r.apply(
            batch("b", 1, vec![hint("ml", "vision", Resource::Gpu, 1.0, 1.5)]),
            0.0,
        );
        assert_eq!(
            r.workload("ml/Deployment/vision").unwrap().desired_replicas,
            2
        );
        assert_eq!(
            r.workload("ml/Deployment/llm").unwrap(),
            r.workload_from_scratch("ml/Deployment/llm").unwrap()
        );
    }

    #[test]
    fn merges_across_nodes_at_risk_quantile() {
        let mut r = Registry::new(policy());
        // Each node: capacity 2 GPUs, p90 forecast 3 → sum demand 6 over 4 capacity → 3 replicas.
        r.apply(
            batch("a", 1, vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)]),
            0.0,
        );
        r.apply(
            batch("b", 1, vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)]),
            0.0,
        );
        let v = r.workload("ml/Deployment/llm").unwrap();
        assert_eq!(v.nodes, 2);
        assert_eq!(v.current_replicas, 2);
        assert_eq!(v.resources[0].capacity, 4.0);
        assert!((v.resources[0].demand - 6.0).abs() < 1e-9);
        assert_eq!(v.desired_replicas, 3);
        assert!(v.active);
        // At risk 0.5 the p50 (2.4 each, 4.8 total) is used: still 3 replicas of 2.
        let mut p = policy();
        p.risk = 0.5;
        let mut r = Registry::new(p);
        r.apply(
            batch("a", 1, vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)]),
            0.0,
        );
        r.apply(
            batch("b", 1, vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)]),
            0.0,
        );
        let v = r.workload("ml/Deployment/llm").unwrap();
        assert!((v.resources[0].demand - 4.8).abs() < 1e-9);
        assert_eq!(v.desired_replicas, 3);
    }

    #[test]
    fn workload_takes_the_most_demanding_resource() {
        let mut r = Registry::new(policy());
        r.apply(
            batch(
                "a",
                1,
                vec![
                    hint("ml", "llm", Resource::Cpu, 4.0, 1.0),
                    hint("ml", "llm", Resource::Gpu, 1.0, 2.5),
                ],
            ),
            0.0,
        );
        let v = r.workload("ml/Deployment/llm").unwrap();
        assert_eq!(v.resources.len(), 2);
        assert_eq!(v.desired_replicas, 3);
    }

    #[test]
    fn replays_are_idempotent_and_new_epochs_restart_counting() {
        let mut r = Registry::new(policy());
        let b1 = batch("a", 5, vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)]);
        assert_eq!(r.apply(b1.clone(), 0.0), Applied::Accepted { hints: 1 });
        let mut newer = batch("a", 6, vec![hint("ml", "llm", Resource::Gpu, 2.0, 9.0)]);
        r.apply(newer.clone(), 1.0);
        assert_eq!(r.apply(b1, 2.0), Applied::Duplicate { last_seq: 6 });
        let v = r.workload("ml/Deployment/llm").unwrap();
        assert!((v.resources[0].demand - 9.0).abs() < 1e-9);
        newer.epoch = 2;
        newer.seq = 1;
        assert_eq!(r.apply(newer, 3.0), Applied::Accepted { hints: 1 });
    }

    #[test]
    fn a_batch_replaces_the_node_state_and_silent_nodes_expire() {
        let mut r = Registry::new(policy());
        r.apply(
            batch("a", 1, vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)]),
            0.0,
        );
        r.apply(
            batch("b", 1, vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)]),
            10.0,
        );
        // Node a no longer runs llm: its next batch drops it.
        r.apply(
            batch("a", 2, vec![hint("ml", "web", Resource::Cpu, 1.0, 1.0)]),
            10.0,
        );
        assert_eq!(r.workload("ml/Deployment/llm").unwrap().nodes, 1);
        assert_eq!(r.expire(35.0, 30.0), 0);
        assert_eq!(r.expire(40.5, 30.0), 2);
        assert_eq!(r.workload_count(), 0);
        assert_eq!(r.node_count(), 0);
    }

    #[test]
    fn resyncs_keep_every_hint() {
        let mut r = Registry::new(policy());
        // Enough updates to one workload to cross the resync threshold several times, with the
        // threshold landing on hints of every position in a batch.
        for seq in 1..=3000u64 {
            for node in ["a", "b", "c"] {
                let hints = vec![
                    hint("ml", "llm", Resource::Cpu, 1.0, (seq % 7) as f64),
                    hint("ml", "llm", Resource::Gpu, 2.0, (seq % 5) as f64),
                ];
                r.apply(batch(node, seq, hints), seq as f64);
            }
        }
        let fast = r.workload("ml/Deployment/llm").unwrap();
        let slow = r.workload_from_scratch("ml/Deployment/llm").unwrap();
        assert!(close(&fast, &slow), "{fast:?} != {slow:?}");
        assert_eq!(fast.resources[0].replicas, 3);
    }

    fn close(a: &WorkloadView, b: &WorkloadView) -> bool {
        let near = |x: f64, y: f64| (x - y).abs() <= 1e-6 * (1.0 + x.abs().max(y.abs()));
        a.id == b.id
            && a.nodes == b.nodes
            && a.current_replicas == b.current_replicas
            && a.desired_replicas == b.desired_replicas
            && a.reasons == b.reasons
            && a.resources.len() == b.resources.len()
            && a.resources.iter().zip(&b.resources).all(|(x, y)| {
                x.resource == y.resource
                    && x.replicas == y.replicas
                    && x.desired_replicas == y.desired_replicas
                    && near(x.capacity, y.capacity)
                    && near(x.usage, y.usage)
                    && near(x.demand, y.demand)
                    && near(x.local_headroom, y.local_headroom)
                    && near(x.confidence, y.confidence)
            })
    }

    fn replay(index: &mut HashMap<String, Arc<Answer>>, changes: Vec<IndexChange>) {
        for c in changes {
            match c {
                IndexChange::Added(id, cell) => {
                    assert!(index.insert(id, cell).is_none(), "added twice");
                }
                IndexChange::Removed(id, _) => {
                    assert!(index.remove(&id).is_some(), "removed unknown {id}");
                }
            }
        }
    }

    #[test]
    fn a_workload_reported_again_keeps_its_answer_cell() {
        let mut r = Registry::new(policy());
        r.apply(
            batch("a", 1, vec![hint("ml", "llm", Resource::Gpu, 2.0, 3.0)]),
            0.0,
        );
        let changes = r.take_index_changes();
        assert!(matches!(&changes[..], [IndexChange::Added(id, _)] if id == "ml/Deployment/llm"));
        let cell = r.answer("ml/Deployment/llm").unwrap();
        assert_eq!(cell.desired_replicas(), 2);
        // The only node reports again with more demand: same cell, new value, no index churn.
        r.apply(
            batch("a", 2, vec![hint("ml", "llm", Resource::Gpu, 2.0, 7.0)]),
            1.0,
        );
        assert!(r.take_index_changes().is_empty());
        assert_eq!(cell.desired_replicas(), 4);
        // It stops reporting the workload: removed, and a reader still holding the cell sees 0.
        let before = cell.desired_replicas();
        r.apply(batch("a", 3, vec![]), 2.0);
        // The index learns what it answered last, for the scalers' stale hold.
        assert!(
            matches!(&r.take_index_changes()[..], [IndexChange::Removed(id, last)] if id == "ml/Deployment/llm" && *last == before && before > 0)
        );
        assert_eq!(cell.desired_replicas(), 0);
        assert!(!cell.active());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Running sums after any sequence of batches, replays and expiries equal a merge from
        /// scratch of what is stored.
        #[test]
        fn running_sums_match_a_full_merge(
            ops in proptest::collection::vec(
                (0usize..6, 0usize..4, proptest::collection::vec((0usize..3, 0usize..3, 0.0f64..8.0, 0.0f64..10.0, 0.0f64..1.0), 0..5), proptest::bool::ANY),
                1..120,
            )
        ) {
            let mut r = Registry::new(policy());
            let mut index: HashMap<String, Arc<Answer>> = HashMap::new();
            let mut seqs = [0u64; 6];
            for (t, (node, reason, hints, expire)) in ops.into_iter().enumerate() {
                let now = t as f64;
                if expire {
                    r.expire(now, 20.0);
                    continue;
                }
                seqs[node] += 1;
                let mut seen = std::collections::HashSet::new();
                let hs: Vec<Hint> = hints
                    .into_iter()
                    .filter(|(w, res, ..)| seen.insert((*w, *res)))
                    .map(|(w, res, cap, p90, conf)| {
                        let resource = [Resource::Cpu, Resource::Gpu, Resource::Memory][res];
                        let mut h = hint("ml", &format!("w{w}"), resource, cap, p90);
                        h.confidence = conf;
                        h.reason = format!("r{reason}");
                        h
                    })
                    .collect();
                r.apply(batch(&format!("n{node}"), seqs[node], hs), now);
                replay(&mut index, r.take_index_changes());
            }
            replay(&mut index, r.take_index_changes());
            let ids: Vec<String> = r.workloads.keys().cloned().collect();
            for id in &ids {
                let fast = r.workload(id).unwrap();
                let slow = r.workload_from_scratch(id).unwrap();
                proptest::prop_assert!(close(&fast, &slow), "{fast:?} != {slow:?}");
                // The published answer is the view's, and the index holds the live cell.
                let cell = r.answer(id).unwrap();
                proptest::prop_assert_eq!(cell.desired_replicas(), fast.desired_replicas);
                proptest::prop_assert_eq!(cell.active(), fast.active);
                proptest::prop_assert!(index.get(id).is_some_and(|c| Arc::ptr_eq(c, &cell)), "{id} missing from the index");
            }
            proptest::prop_assert_eq!(index.len(), ids.len());
        }
    }
}
