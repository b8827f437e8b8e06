//! What the kubelet owns changes through the API: a Kubernetes container's CPU limit is set with
//! the pod's `resize` subresource (in-place pod resize), never by writing the container's quota
//! behind the kubelet's back. Before the first change of a container its original limit is
//! recorded in the state directory (write-ahead), so it is put back through the same path on
//! `SIGTERM`, by `--restore`, and on the next start after a crash.
//!
//! The kubelet's answer is followed in the pod's status (`PodResizePending` Deferred or
//! Infeasible, `PodResizeInProgress`, the applied limit) and in the container's cgroup. A limit
//! that someone else changed (an operator, a VPA, another agent) is drift: that container's CPU
//! is left alone for a back-off period, with an Event saying why; the agent never fights.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::kube::{Api, KubeError, PodDirectory, PodEvent, PodInfo};
use crate::state::{Kind, StateDir};

/// Original CPU limits of the containers the agent resized, as JSON.
pub const RESIZES: Kind = Kind {
    tag: b"RESIZES\0",
    version: 1,
    file: "resizes.json",
};

/// How long a container's CPU is left alone after someone else changed its limit.
pub const DRIFT_BACKOFF: Duration = Duration::from_secs(600);
/// How long before a refused (Infeasible) or failed resize is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// At most one Event per pod and reason in this long.
const EVENT_INTERVAL: Duration = Duration::from_secs(30);

/// The CPU limit a resized container had before headroom's first resize of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Original {
    namespace: String,
    pod: String,
    uid: String,
    container: String,
    cpu_limit_millis: Option<u64>,
}

#[derive(Debug, Clone)]
struct Set {
    millis: u64,
    cgroup: String,
    /// The spec's limit when the resize was sent.
    before: Option<u64>,
    /// The watch has shown the pod's spec holding `millis` (until then, for up to `SPEC_LAG`,
    /// the spec still holding `before` is the watch lagging, not drift).
    seen: bool,
    at: Instant,
    confirmed: bool,
}

/// How long the pod's spec may take to show a resize the API server accepted.
const SPEC_LAG: Duration = Duration::from_secs(30);

/// Why a resize was not requested this pass.
#[derive(Debug, Clone, PartialEq)]
pub enum NotNow {
    /// The pod is not (yet) in the API's list, or the container has no status.
    Unknown(String),
    /// The kubelet is still working on the previous one, or deferred it.
    Pending(String),
    /// Someone else changed the limit; left alone until the back-off ends.
    Drift(String),
    /// A failure, retried later.
    Failed(String),
}

impl std::fmt::Display for NotNow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotNow::Unknown(s) | NotNow::Pending(s) | NotNow::Drift(s) | NotNow::Failed(s) => {
                f.write_str(s)
            }
        }
    }
}

pub struct Resizer {
    api: Api,
    pods: Arc<PodDirectory>,
    runtime: tokio::runtime::Handle,
    node: String,
    dir: StateDir,
    /// `uid/container` → the limit before the agent's first change.
    originals: BTreeMap<String, Original>,
    /// `uid/container` → the limit the agent asked for last.
    set: HashMap<String, Set>,
    /// `uid/container` → no resize before this instant.
    hold: HashMap<String, Instant>,
    events: HashMap<(String, &'static str), Instant>,
    /// Failures already logged (kind of failure), so each is logged once.
    logged: std::collections::HashSet<String>,
}

/// How many containers' original limits `dir` records (resized and not yet restored).
pub fn recorded(dir: &StateDir) -> usize {
    dir.load(RESIZES)
        .ok()
        .flatten()
        .and_then(|b| decode_journal(&b).ok())
        .map_or(0, |m| m.len())
}

/// The record of resized pods (`uid/container` to the limits it had), as [`RESIZES`] stores it.
pub fn decode_journal(bytes: &[u8]) -> Result<BTreeMap<String, Original>, serde_json::Error> {
    serde_json::from_slice(bytes)
}

fn key(uid: &str, container: &str) -> String {
    format!("{uid}/{container}")
}

impl Resizer {
    pub fn open(
        api: Api,
        pods: Arc<PodDirectory>,
        runtime: tokio::runtime::Handle,
        node: String,
        dir: StateDir,
    ) -> Resizer {
        let originals = match dir.load(RESIZES) {
            Ok(Some(bytes)) => decode_journal(&bytes).unwrap_or_else(|e| {
                tracing::error!(error = %e, dir = %dir.path().display(), "the record of resized pods is unreadable; starting a new one");
                BTreeMap::new()
            }),
            Ok(None) => BTreeMap::new(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the record of resized pods");
                BTreeMap::new()
            }
        };
        Resizer {
            api,
            pods,
            runtime,
            node,
            dir,
            originals,
            set: HashMap::new(),
            hold: HashMap::new(),
            events: HashMap::new(),
            logged: Default::default(),
        }
    }

    fn save(&self) -> Result<(), String> {
        let bytes = serde_json::to_vec(&self.originals).map_err(|e| e.to_string())?;
        self.dir.save(RESIZES, &bytes).map_err(|e| e.to_string())
    }

    fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, KubeError>>,
    ) -> Result<T, String> {
        self.runtime
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, fut).await })
            .map_err(|_| format!("the API server did not answer within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())
    }

    fn event(&mut self, pod: &PodInfo, reason: &'static str, message: &str, warning: bool) {
        let k = (pod.uid.clone(), reason);
        if self
            .events
            .get(&k)
            .is_some_and(|t| t.elapsed() < EVENT_INTERVAL)
        {
            return;
        }
        self.events.insert(k, Instant::now());
        let e = PodEvent {
            namespace: &pod.namespace,
            pod: &pod.name,
            uid: &pod.uid,
            node: &self.node,
            reason,
            message,
            warning,
        };
        let result = self.call(self.api.pod_event(&e));
        self.pods.note_write("event", &result);
        if let Err(err) = result
            && self.logged.insert("event".into())
        {
            tracing::warn!(error = %err, "cannot record Kubernetes Events; decisions are still logged here and in /v1/decisions");
        }
    }

    /// Asks the kubelet, through the API, for `to_cores` as the container's CPU limit.
    pub fn resize_cpu(
        &mut self,
        uid: &str,
        container: &str,
        cgroup: &str,
        to_cores: f64,
        why: &str,
    ) -> Result<String, NotNow> {
        let k = key(uid, container);
        if let Some(until) = self.hold.get(&k)
            && Instant::now() < *until
        {
            let left = until.saturating_duration_since(Instant::now()).as_secs();
            return Err(NotNow::Drift(format!(
                "not managing this limit for another {left} s"
            )));
        }
        let Some(pod) = self.pods.pod(uid) else {
            return Err(NotNow::Unknown("pod not yet seen through the API".into()));
        };
        let Some(spec) = pod.spec_cpu.get(container).copied() else {
            return Err(NotNow::Unknown(format!(
                "no container {container} in the pod's spec"
            )));
        };
        if let Some(note) = self.drifted(&pod, container, spec.limit_millis) {
            return Err(NotNow::Drift(note));
        }
        if let Some((kind, reason)) = &pod.resize {
            let what = format!(
                "{kind}{}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({reason})")
                }
            );
            if reason == "Infeasible" || reason == "Error" {
                self.hold.insert(k.clone(), Instant::now() + RETRY_AFTER);
                let refused = format!(
                    "{}/{} {container}: the kubelet answered {what}",
                    pod.namespace, pod.name
                );
                self.pods.note_write("resize", &Err(refused.clone()));
                if self
                    .logged
                    .insert(format!("refused:{uid}:{container}:{what}"))
                {
                    tracing::warn!(error = %refused, "in-place resize refused by the kubelet; retrying in {} s", RETRY_AFTER.as_secs());
                }
                self.event(
                    &pod,
                    "HeadroomResizeRefused",
                    &format!(
                        "the kubelet answered {what}; trying again in {} s",
                        RETRY_AFTER.as_secs()
                    ),
                    true,
                );
            }
            return Err(NotNow::Pending(format!("previous resize: {what}")));
        }
        let floor = spec.request_millis.unwrap_or(0).max(10);
        let target = ((to_cores * 1000.0).round() as u64).max(floor);
        if spec.limit_millis == Some(target) {
            return Ok("limit already there".into());
        }
        if !self.originals.contains_key(&k) {
            self.originals.insert(
                k.clone(),
                Original {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    uid: uid.to_string(),
                    container: container.to_string(),
                    cpu_limit_millis: spec.limit_millis,
                },
            );
            if let Err(e) = self.save() {
                self.originals.remove(&k);
                return Err(NotNow::Failed(format!(
                    "cannot record the original limit: {e}"
                )));
            }
        }
        let result = self.call(self.api.resize_cpu_limit(
            &pod.namespace,
            &pod.name,
            container,
            Some(target),
            pod.resource_version.as_deref(),
        ));
        if let Err(e) = &result
            && e.contains("HTTP 409")
        {
            // The pod changed since the watch showed it: look again next pass (a limit someone
            // else set is drift then), never overwrite it unseen.
            return Err(NotNow::Pending(format!(
                "the pod changed since it was read: {e}"
            )));
        }
        self.pods.note_write("resize", &result);
        match result {
            Ok(()) => {
                self.set.insert(
                    k,
                    Set {
                        millis: target,
                        cgroup: cgroup.to_string(),
                        before: spec.limit_millis,
                        seen: false,
                        at: Instant::now(),
                        confirmed: false,
                    },
                );
                let from = spec
                    .limit_millis
                    .map_or("none".to_string(), |m| format!("{m}m"));
                self.event(
                    &pod,
                    "HeadroomResize",
                    &format!("{container}: cpu limit {from} -> {target}m ({why})"),
                    false,
                );
                Ok(format!("pods/resize: cpu limit {from} -> {target}m"))
            }
            Err(e) => {
                self.hold.insert(k, Instant::now() + RETRY_AFTER);
                if self
                    .logged
                    .insert(format!("resize:{}", e.split(':').next().unwrap_or("")))
                {
                    tracing::warn!(error = %e, pod = %pod.name, container, "in-place resize refused; retrying later");
                }
                Err(NotNow::Failed(e))
            }
        }
    }

    /// Drift: the spec's limit is not the one the agent set last.
    fn drifted(&mut self, pod: &PodInfo, container: &str, now: Option<u64>) -> Option<String> {
        let k = key(&pod.uid, container);
        let set = self.set.get_mut(&k)?;
        if now == Some(set.millis) {
            set.seen = true;
            return None;
        }
        // Any other value is someone else's, however soon after our write it appears.
        if !set.seen && now == set.before && set.at.elapsed() < SPEC_LAG {
            return None;
        }
        let msg = format!(
            "{container}: cpu limit changed to {} by someone else (headroom had set {}m); not managing it for {} s",
            now.map_or("none".to_string(), |m| format!("{m}m")),
            set.millis,
            DRIFT_BACKOFF.as_secs()
        );
        tracing::warn!(pod = %pod.name, namespace = %pod.namespace, "{msg}");
        self.set.remove(&k);
        // What the other writer chose is the value to go back to on exit, not the agent's old one.
        self.originals.remove(&k);
        let _ = self.save();
        self.hold.insert(k, Instant::now() + DRIFT_BACKOFF);
        self.event(pod, "HeadroomDrift", &msg, true);
        Some(msg)
    }

    /// Once a pass: notices drift without waiting for the next decision, and confirms applied
    /// resizes in the container's cgroup (`read_quota` gives its current quota in cores).
    pub fn check(&mut self, read_quota: &dyn Fn(&str) -> Option<f64>) {
        let keys: Vec<String> = self.set.keys().cloned().collect();
        for k in keys {
            let Some((uid, container)) = k.split_once('/') else {
                continue;
            };
            let Some(pod) = self.pods.pod(uid) else {
                // The pod is gone: nothing to watch or restore.
                self.set.remove(&k);
                if self.originals.remove(&k).is_some() {
                    let _ = self.save();
                }
                continue;
            };
            let spec = pod.spec_cpu.get(container).and_then(|s| s.limit_millis);
            if self.drifted(&pod, container, spec).is_some() {
                continue;
            }
            let Some(set) = self.set.get_mut(&k) else {
                continue;
            };
            let applied = pod.applied_cpu_limit.get(container).copied().flatten();
            if !set.confirmed && applied == Some(set.millis) {
                let quota = read_quota(&set.cgroup);
                let matches = quota.is_some_and(|q| (q * 1000.0 - set.millis as f64).abs() <= 1.0);
                if matches {
                    set.confirmed = true;
                    tracing::info!(pod = %pod.name, container, limit_millis = set.millis, "the kubelet applied the resize; the cgroup holds the new quota");
                }
            }
        }
    }

    /// [`Resizer::restore_all`], logged; does nothing when nothing is recorded.
    pub fn restore_logged(&mut self) {
        if self.originals.is_empty() {
            return;
        }
        let (n, errors) = self.restore_all();
        for e in &errors {
            tracing::error!(error = %e, "cannot restore a pod's original CPU limit");
        }
        tracing::info!(
            restored = n,
            failed = errors.len(),
            "restored pods' original CPU limits through pods/resize"
        );
    }

    /// Puts every original limit back through the API; returns how many, and the failures.
    pub fn restore_all(&mut self) -> (usize, Vec<String>) {
        let mut restored = 0;
        let mut errors = Vec::new();
        let todo: Vec<(String, Original)> = self
            .originals
            .iter()
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        for (k, o) in todo {
            if self.pods.status().state == "synced" && self.pods.pod(&o.uid).is_none() {
                self.originals.remove(&k);
                continue;
            }
            match self.call(self.api.resize_cpu_limit(
                &o.namespace,
                &o.pod,
                &o.container,
                o.cpu_limit_millis,
                None,
            )) {
                Ok(()) => {
                    restored += 1;
                    self.originals.remove(&k);
                    self.set.remove(&k);
                }
                Err(e) if e.contains("HTTP 404") => {
                    self.originals.remove(&k);
                }
                Err(e) => errors.push(format!("{}/{} {}: {e}", o.namespace, o.pod, o.container)),
            }
        }
        if let Err(e) = self.save() {
            errors.push(e);
        }
        (restored, errors)
    }
}
