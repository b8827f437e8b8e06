//! The aggregator's shared, in-memory state: the hint registry behind a lock, the index of
//! published per-workload answers the KEDA scaler reads, the change signal that wakes KEDA push
//! streams, per-node rate limiting, and ingest counters.
//!
//! It owns no sockets and no files; servers (HTTP, gRPC) borrow it through an `Arc`. Locks are held
//! only for the arithmetic of one request, never across an await. The scaler's reads never take
//! the registry lock: they look up an answer cell under a read lock that writers hold only to
//! add or remove a workload, and load it atomically.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::watch;

use crate::merge::{Answer, Applied, IndexChange, MergePolicy, NodeView, Registry, WorkloadView};
use headroom_protocol::schema::HintBatch;

/// Token bucket per key: `rate` tokens per second, at most `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, (f64, f64)>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter {
            rate,
            burst: burst.max(1.0),
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `key` at time `now` (seconds). `Err(wait)` says how long until one is
    /// available. A rate of 0 disables limiting.
    pub fn take(&mut self, key: &str, now: f64) -> Result<(), f64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = match self.buckets.get_mut(key) {
            Some(b) => b,
            None => self.buckets.entry(key.to_owned()).or_insert((burst, now)),
        };
        b.0 = (b.0 + (now - b.1) * rate).min(burst);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            Ok(())
        } else {
            Err((1.0 - b.0) / rate)
        }
    }

    /// Forgets buckets that have refilled completely: they carry no information.
    pub fn prune(&mut self, now: f64) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .retain(|_, b| rate > 0.0 && b.0 + (now - b.1) * rate < burst);
    }
}

/// Ingest counters exported at `/metrics`.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    pub batches: Family<[(&'static str, &'static str); 1], Counter>,
    pub rejected: Family<[(&'static str, &'static str); 1], Counter>,
    pub hints: Counter,
    pub expired_nodes: Counter,
}

#[derive(Debug)]
pub struct Shared {
    registry: Mutex<Registry>,
    /// Workload id -> its published answer; changed only when a workload appears or vanishes.
    answers: RwLock<HashMap<String, Arc<Answer>>>,
    limiter: Mutex<RateLimiter>,
    pub policy: MergePolicy,
    started: Instant,
    changes: watch::Sender<u64>,
    generation: AtomicU64,
    pub metrics: IngestMetrics,
    ready: AtomicBool,
    /// Recent merged views for the status page, sampled by [`Shared::expire`].
    pub timeline: Mutex<crate::page::Timeline>,
    /// Workloads no node reports any more: their last answer and when they went silent.
    silent: Mutex<HashMap<String, Silent>>,
    /// Seconds a silent workload keeps its last answer (see [`Lookup`]); milliseconds stored.
    stale_hold_ms: AtomicU64,
}

/// A workload no node reports any more.
#[derive(Debug)]
struct Silent {
    /// Its last answer, frozen.
    answer: Arc<Answer>,
    /// When it went silent, on the registry's clock.
    since: f64,
    /// Set once the stale hold has passed and the push streams were told (see `expire`).
    told: bool,
}

/// How long a silent workload is remembered at all (its fallback answer); then it is unknown.
const FORGET_SILENT_S: f64 = 86_400.0;
/// Default of [`Shared::set_stale_hold`].
pub const DEFAULT_STALE_HOLD_S: f64 = 300.0;

/// What the aggregator can say about a workload id, for the scalers.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Nodes report it now.
    Live(Arc<Answer>),
    /// No node has reported it for `silent_s` seconds, within the stale hold: its last answer
    /// stands, so a node or network outage never drops replicas at once.
    Stale { answer: Arc<Answer>, silent_s: f64 },
    /// Silent for longer than the hold: the documented fallback, inactive and 0 replicas (a
    /// workload whose pods all went away is at zero, or its nodes are).
    Gone { silent_s: f64 },
    /// No node has reported it since the aggregator started: a wrong id, or a workload that
    /// never ran here. Scalers answer an error, never a number.
    Unknown,
}

impl Lookup {
    /// Active and desired replicas as the scalers serve them; `None` for [`Lookup::Unknown`].
    pub fn replicas(&self) -> Option<(bool, u64)> {
        match self {
            Lookup::Live(a) | Lookup::Stale { answer: a, .. } => {
                Some((a.active(), a.desired_replicas()))
            }
            Lookup::Gone { .. } => Some((false, 0)),
            Lookup::Unknown => None,
        }
    }
}

/// Outcome of offering a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ingest {
    Applied(Applied),
    /// Too many batches from this node; retry after this many seconds.
    RateLimited(f64),
}

impl Shared {
    pub fn new(policy: MergePolicy, node_rate: f64, node_burst: f64) -> Arc<Self> {
        let (changes, _) = watch::channel(0);
        Arc::new(Shared {
            registry: Mutex::new(Registry::new(policy)),
            answers: RwLock::new(HashMap::new()),
            limiter: Mutex::new(RateLimiter::new(node_rate, node_burst)),
            policy,
            started: Instant::now(),
            changes,
            generation: AtomicU64::new(0),
            metrics: IngestMetrics::default(),
            ready: AtomicBool::new(false),
            timeline: Mutex::new(crate::page::Timeline::default()),
            silent: Mutex::new(HashMap::new()),
            stale_hold_ms: AtomicU64::new((DEFAULT_STALE_HOLD_S * 1000.0) as u64),
        })
    }

    /// How long a workload no node reports keeps its last answer (`--stale-hold`).
    pub fn set_stale_hold(&self, hold: std::time::Duration) {
        self.stale_hold_ms
            .store(hold.as_millis() as u64, Ordering::Relaxed);
    }

    /// What the scalers answer for `id`: live, held after its nodes went silent, fallen back,
    /// or unknown. Never waits for ingest.
    pub fn lookup(&self, id: &str) -> Lookup {
        if let Some(a) = self.answer(id) {
            return Lookup::Live(a);
        }
        let silent = self.silent.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = silent.get(id) else {
            return Lookup::Unknown;
        };
        let silent_s = (self.now() - w.since).max(0.0);
        let hold = self.stale_hold_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        if silent_s <= hold {
            Lookup::Stale {
                answer: w.answer.clone(),
                silent_s,
            }
        } else {
            Lookup::Gone { silent_s }
        }
    }

    /// Seconds since start, the registry's clock.
    pub fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mirrors workloads added to or removed from the registry into the answer index. Called with
    /// the registry lock held, so the index never runs ahead of or behind the registry for long.
    fn update_index(&self, registry: &mut Registry) {
        let changes = registry.take_index_changes();
        if changes.is_empty() {
            return;
        }
        let now = self.now();
        let mut index = self.answers.write().unwrap_or_else(|p| p.into_inner());
        let mut silent = self.silent.lock().unwrap_or_else(|p| p.into_inner());
        for c in changes {
            match c {
                IndexChange::Added(id, cell) => {
                    silent.remove(&id);
                    index.insert(id, cell);
                }
                IndexChange::Removed(id, last) => {
                    index.remove(&id);
                    silent.insert(
                        id,
                        Silent {
                            answer: Answer::fixed(last),
                            since: now,
                            told: false,
                        },
                    );
                }
            }
        }
    }

    /// The published answer for one workload; never waits for ingest.
    pub fn answer(&self, id: &str) -> Option<Arc<Answer>> {
        self.answers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn bump(&self) {
        let g = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.changes.send_replace(g);
    }

    /// Signal that fires after every change to any workload view.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn ingest(&self, batch: HintBatch) -> Ingest {
        let now = self.now();
        if let Err(wait) = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&batch.node, now)
        {
            self.metrics
                .rejected
                .get_or_create(&[("reason", "rate_limited")])
                .inc();
            return Ingest::RateLimited(wait);
        }
        let applied = {
            let mut registry = self.registry();
            let applied = registry.apply(batch, now);
            self.update_index(&mut registry);
            applied
        };
        match applied {
            Applied::Accepted { hints } => {
                self.metrics
                    .batches
                    .get_or_create(&[("result", "accepted")])
                    .inc();
                self.metrics.hints.inc_by(hints as u64);
                self.bump();
            }
            Applied::Duplicate { .. } => {
                self.metrics
                    .batches
                    .get_or_create(&[("result", "duplicate")])
                    .inc();
            }
        }
        Ingest::Applied(applied)
    }

    /// Drops silent nodes and adds a timeline point when one is due; run periodically.
    pub fn expire(&self) -> usize {
        self.sample_timeline();
        let now = self.now();
        let n = {
            let mut registry = self.registry();
            let n = registry.expire(now, self.policy.node_ttl_s);
            self.update_index(&mut registry);
            n
        };
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .prune(now);
        let hold = self.stale_hold_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let mut fell_back = false;
        self.silent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, w| {
                if !w.told && now - w.since > hold {
                    w.told = true;
                    fell_back = true;
                }
                now - w.since < FORGET_SILENT_S
            });
        if n > 0 {
            self.metrics.expired_nodes.inc_by(n as u64);
        }
        // Push streams learn of expired nodes and of workloads whose stale hold ran out.
        if n > 0 || fell_back {
            self.bump();
        }
        n
    }

    fn sample_timeline(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut t = self.timeline.lock().unwrap_or_else(|p| p.into_inner());
        if t.due(now) {
            // Views only of the workloads the timeline follows: with many thousands of
            // workloads, building them all would hold the registry for milliseconds.
            let views: Vec<WorkloadView> = {
                let r = self.registry();
                let ids = t.followed(r.ids());
                ids.iter().filter_map(|id| r.workload(id)).collect()
            };
            t.record(now, &views);
        }
    }

    /// The status page at `/`.
    pub fn page(&self, query: &str) -> String {
        let nodes = self.nodes();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let header = crate::page::Header {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.now(),
            risk: self.policy.risk,
        };
        let t = self.timeline.lock().unwrap_or_else(|p| p.into_inner());
        crate::page::render(
            &header,
            &t,
            &nodes,
            &crate::page::Options::from_query(query),
            now,
        )
    }

    pub fn workload(&self, id: &str) -> Option<WorkloadView> {
        self.registry().workload(id)
    }

    pub fn workloads(&self) -> Vec<WorkloadView> {
        self.registry().workloads()
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        let now = self.now();
        self.registry().nodes(now)
    }

    pub fn counts(&self) -> (usize, usize) {
        let r = self.registry();
        (r.node_count(), r.workload_count())
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_limits_and_refills() {
        let mut l = RateLimiter::new(2.0, 3.0);
        for _ in 0..3 {
            assert!(l.take("a", 0.0).is_ok());
        }
        let wait = l.take("a", 0.0).unwrap_err();
        assert!((wait - 0.5).abs() < 1e-9);
        assert!(l.take("b", 0.0).is_ok(), "keys are independent");
        assert!(l.take("a", 0.5).is_ok());
        l.prune(100.0);
        assert!(l.buckets.is_empty());
        let mut off = RateLimiter::new(0.0, 1.0);
        for _ in 0..100 {
            assert!(off.take("a", 0.0).is_ok());
        }
    }

    /// Nodes go silent: the last answer stands for the hold, then inactive and zero; an id no
    /// node ever reported is unknown throughout.
    #[test]
    fn silent_workloads_hold_their_last_answer_then_fall_back() {
        let policy = MergePolicy {
            risk: 0.1,
            min_confidence: 0.5,
            node_ttl_s: 0.05,
        };
        let shared = Shared::new(policy, 0.0, 1.0);
        shared.set_stale_hold(std::time::Duration::from_millis(300));
        let id = "ml/Deployment/llm";
        use headroom_protocol::fixtures::{batch, hint};
        let b = batch(
            "node-a",
            1,
            vec![hint(
                "ml",
                "llm",
                headroom_protocol::schema::Resource::Gpu,
                2.0,
                7.0,
            )],
        );
        assert!(matches!(shared.ingest(b), Ingest::Applied(_)));
        let live = shared.lookup(id).replicas().expect("live");
        assert!(live.0 && live.1 > 1, "{live:?}");
        assert!(matches!(
            shared.lookup("ml/Deployment/typo"),
            Lookup::Unknown
        ));
        let mut changes = shared.subscribe();
        changes.mark_unchanged();

        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(shared.expire(), 1);
        assert!(shared.answer(id).is_none(), "the node's hints are gone");
        match shared.lookup(id) {
            Lookup::Stale { answer, silent_s } => {
                assert_eq!((answer.active(), answer.desired_replicas()), live);
                assert!(silent_s < 0.3, "{silent_s}");
            }
            other => panic!("want Stale, got {other:?}"),
        }
        assert!(changes.has_changed().unwrap_or(false));
        changes.mark_unchanged();

        std::thread::sleep(std::time::Duration::from_millis(350));
        assert_eq!(shared.expire(), 0);
        assert!(matches!(shared.lookup(id), Lookup::Gone { .. }));
        assert_eq!(shared.lookup(id).replicas(), Some((false, 0)));
        assert!(
            changes.has_changed().unwrap_or(false),
            "push streams hear of the fallback"
        );
        assert!(matches!(
            shared.lookup("ml/Deployment/typo"),
            Lookup::Unknown
        ));
    }
}
