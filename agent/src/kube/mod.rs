//! Who the pods on this node are, from the Kubernetes API server: a list and watch of the pods
//! whose `spec.nodeName` is this node, each pod's workload resolved through its controller's
//! ownerReferences (ReplicaSet → Deployment, Job → CronJob; StatefulSet, DaemonSet and others
//! as they are; a pod with no controller is its own workload), and its containers' names by
//! container id. Reads only; without API access (a systemd install, no RBAC) the agent says so
//! once and keeps naming containers from kubelet's log directory.

pub mod pod_resources;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::config::KubernetesConfig;
use headroom_protocol::client::error_chain;

/// Where Kubernetes mounts a pod's service account credentials.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Pod annotation: `"true"` lets the policy manage the pod's containers, `"false"` keeps it out
/// whatever `policy.manage` says.
pub const ANNOTATION_MANAGE: &str = "headroom.dev/manage";
/// Pod annotation: the latency SLO of the pod's requests (`"50ms"`, `"0.2s"`, `"0.2"` seconds),
/// overriding `policy.latency_slo_s` for its containers.
pub const ANNOTATION_LATENCY_SLO: &str = "headroom.dev/latency-slo";
/// A watch ends after this long and is resumed from its last resource version.
const WATCH_TIMEOUT_S: u64 = 290;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The workload a pod belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    /// The version of the pod this was read from: a write conditioned on it fails (409) if
    /// anyone changed the pod since.
    pub resource_version: Option<String>,
    pub namespace: String,
    pub name: String,
    pub owner: Owner,
    /// Container id (without the `containerd://` scheme) → container name.
    pub containers: HashMap<String, String>,
    /// `Some(true|false)` from the [`ANNOTATION_MANAGE`] annotation.
    pub manage: Option<bool>,
    /// Microseconds, from the [`ANNOTATION_LATENCY_SLO`] annotation.
    pub latency_slo_us: Option<u64>,
    /// Annotations of ours whose value is not understood (ignored, logged once).
    pub annotation_errors: Vec<String>,
    /// Container name → its CPU request and limit as the spec says (millicores).
    pub spec_cpu: HashMap<String, CpuResources>,
    /// Container name → the CPU limit the kubelet reports as applied (millicores).
    pub applied_cpu_limit: HashMap<String, Option<u64>>,
    /// `PodResizePending` (with its reason, `Deferred` or `Infeasible`) or `PodResizeInProgress`
    /// (with its reason when the last attempt failed), while a resize is under way.
    pub resize: Option<(String, String)>,
    /// The pod IP and its `prometheus.io/*` annotations, for the inference-engine sampler.
    pub scrape: PodScrape,
}

/// What a Kubernetes pod says about its metrics endpoint and its replica targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodScrape {
    pub ip: Option<std::net::IpAddr>,
    /// `prometheus.io/scrape`: `false` turns scraping off for the pod.
    pub scrape: Option<bool>,
    /// `prometheus.io/port`: the only port scraped.
    pub port: Option<u16>,
    /// `prometheus.io/path` (default `/metrics`).
    pub path: Option<String>,
    /// `headroom.dev/target-waiting-per-replica`, `-kv-cache-ratio`, `-tokens-per-second`,
    /// `-concurrency-per-replica`.
    /// (As written; read by `sample::engines::targets_of`.)
    pub target_waiting_per_replica: Option<String>,
    pub target_kv_cache_ratio: Option<String>,
    pub target_tokens_per_second: Option<String>,
    pub target_concurrency_per_replica: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuResources {
    pub request_millis: Option<u64>,
    pub limit_millis: Option<u64>,
}

/// `"250m"`, `"1"`, `"1.5"` → millicores.
pub fn parse_cpu_millis(q: &str) -> Option<u64> {
    let q = q.trim();
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().ok();
    }
    let cores: f64 = q.parse().ok()?;
    (cores.is_finite() && cores >= 0.0).then(|| (cores * 1000.0).round() as u64)
}

/// `"50ms"`, `"0.2s"`, `"0.2"` → seconds.
fn parse_seconds(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, scale) = if let Some(ms) = v.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = v.strip_suffix('s') {
        (s, 1.0)
    } else {
        (v, 1.0)
    };
    let n: f64 = num.trim().parse().ok()?;
    n.is_finite().then_some(n * scale)
}

/// Where the API stands, for `/v1/status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ApiStatus {
    /// `off` (not configured or not in a cluster), `connecting`, `synced` or `error`.
    pub state: &'static str,
    pub pods: usize,
    /// The newest failure, with the endpoint it happened on.
    pub error: Option<String>,
    /// What the agent does without the API.
    pub fallback: Option<&'static str>,
    /// The newest failed write (a resize or an Event), with what it was.
    pub write_error: Option<String>,
    /// Resizes the API server accepted.
    pub resizes: u64,
}

/// The pods of this node, kept current by a watch; shared with the samplers.
#[derive(Debug)]
pub struct PodDirectory {
    pods: RwLock<HashMap<String, Arc<PodInfo>>>,
    status: Mutex<ApiStatus>,
}

impl Default for PodDirectory {
    fn default() -> Self {
        PodDirectory::new()
    }
}

impl PodDirectory {
    /// An empty directory that has not been listed yet.
    pub fn new() -> PodDirectory {
        PodDirectory {
            pods: RwLock::new(HashMap::new()),
            status: Mutex::new(ApiStatus {
                state: "connecting",
                pods: 0,
                error: None,
                fallback: None,
                write_error: None,
                resizes: 0,
            }),
        }
    }

    /// A directory filled by hand (tests, and callers that learn pods elsewhere).
    pub fn from_pods(pods: impl IntoIterator<Item = PodInfo>) -> PodDirectory {
        let d = PodDirectory::new();
        d.replace(pods.into_iter().collect());
        d
    }

    pub fn pod(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .cloned()
    }

    pub fn status(&self) -> ApiStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn replace(&self, pods: Vec<PodInfo>) {
        let map: HashMap<_, _> = pods
            .into_iter()
            .map(|p| (p.uid.clone(), Arc::new(p)))
            .collect();
        let n = map.len();
        *self.pods.write().unwrap_or_else(|e| e.into_inner()) = map;
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.state = "synced";
        s.pods = n;
        s.error = None;
        s.fallback = None;
    }

    fn upsert(&self, pod: PodInfo) {
        let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
        pods.insert(pod.uid.clone(), Arc::new(pod));
        let n = pods.len();
        self.status.lock().unwrap_or_else(|e| e.into_inner()).pods = n;
    }

    fn remove(&self, uid: &str) {
        let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
        pods.remove(uid);
        let n = pods.len();
        self.status.lock().unwrap_or_else(|e| e.into_inner()).pods = n;
    }

    /// Records the outcome of a write (resize or Event) for `/v1/status`.
    pub fn note_write(&self, what: &str, result: &Result<(), String>) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) if what == "resize" => s.resizes += 1,
            Ok(()) => {}
            Err(e) => s.write_error = Some(format!("{what}: {e}")),
        }
    }

    fn failed(&self, error: String) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.state = "error";
        s.error = Some(error);
        s.fallback = Some("container names from kubelet's log directory, owners from pod names");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("{path}: {source}")]
    Credentials {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error("{url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("{url}: cannot decode the answer: {reason}")]
    Decode { url: String, reason: String },
}

/// How to reach the API server from inside a pod.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub base: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub node: String,
}

impl ApiConfig {
    /// In-cluster settings (`KUBERNETES_SERVICE_HOST`, the service account mount), or `None`
    /// when the agent does not run in a pod with API credentials.
    pub fn in_cluster(cfg: &KubernetesConfig, node: &str) -> Option<ApiConfig> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        let token_file = dir.join("token");
        if !token_file.is_file() {
            return None;
        }
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Some(ApiConfig {
            base: cfg
                .api_server
                .clone()
                .unwrap_or_else(|| format!("https://{host}:{port}")),
            token_file,
            ca_file: dir.join("ca.crt"),
            node: node.to_string(),
        })
    }
}

/// What [`start`] gives the agent: the pods of its node and, when credentials load, a client
/// for the few writes it makes (resizes, events).
pub struct Kube {
    pub pods: Arc<PodDirectory>,
    pub api: Option<Api>,
}

/// Starts the watch on `runtime` when the API is configured and reachable in principle;
/// `None` (logged once) when the agent runs without it.
pub fn start(
    cfg: &KubernetesConfig,
    node: &str,
    runtime: &tokio::runtime::Runtime,
) -> Option<Kube> {
    if !cfg.api {
        return None;
    }
    let Some(api) = ApiConfig::in_cluster(cfg, node) else {
        tracing::info!(
            "not in a Kubernetes pod with a service account token; pod names come from kubelet's log directory, owners from pod names"
        );
        return None;
    };
    let dir = Arc::new(PodDirectory::new());
    let client = match Api::new(&api) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot use the Kubernetes API; pod names come from kubelet's log directory");
            dir.failed(e.to_string());
            return Some(Kube {
                pods: dir,
                api: None,
            });
        }
    };
    tracing::info!(api = %api.base, node, "watching this node's pods through the Kubernetes API");
    let watcher = Watcher {
        api: client.clone(),
        node: api.node.clone(),
        owners: HashMap::new(),
        logged: Default::default(),
    };
    runtime.spawn(watch_pods(watcher, dir.clone()));
    Some(Kube {
        pods: dir,
        api: Some(client),
    })
}

type Http = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Requests to the API server with the pod's service account; cheap to clone.
#[derive(Clone)]
pub struct Api {
    http: Http,
    base: String,
    token_file: PathBuf,
}

struct Watcher {
    api: Api,
    node: String,
    /// Annotation errors already logged.
    logged: std::collections::HashSet<String>,
    /// Controllers already resolved: (namespace, kind, name) → the workload above them.
    owners: HashMap<(String, String, String), Owner>,
}

impl Api {
    pub fn new(api: &ApiConfig) -> Result<Api, KubeError> {
        let tls = headroom_protocol::tls::client_config(Some(&api.ca_file))
            .map_err(|e| KubeError::Tls(e.to_string()))?;
        let https = headroom_protocol::tls::https_connector(tls, REQUEST_TIMEOUT);
        Ok(Api {
            http: Client::builder(TokioExecutor::new()).build(https),
            base: api.base.trim_end_matches('/').to_string(),
            token_file: api.token_file.clone(),
        })
    }

    /// The token is re-read on each request: kubelet rotates projected tokens.
    fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Request<Full<Bytes>>, KubeError> {
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|e| KubeError::Credentials {
                path: self.token_file.clone(),
                source: e,
            })?;
        let mut b = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", token.trim()))
            .header("Accept", "application/json");
        let payload = match body {
            Some((content_type, bytes)) => {
                b = b.header("Content-Type", content_type);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        b.body(Full::new(payload)).map_err(|e| KubeError::Request {
            url: format!("{method} {path}"),
            reason: e.to_string(),
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, KubeError> {
        self.send(hyper::Method::GET, path, None).await
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<T, KubeError> {
        let req = self.request(method.clone(), path, body)?;
        let path = &format!("{method} {path}");
        let fut = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| KubeError::Request {
                    url: path.to_string(),
                    reason: error_chain(&e),
                })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| KubeError::Request {
                    url: path.to_string(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            if !status.is_success() {
                return Err(KubeError::Status {
                    url: path.to_string(),
                    status,
                    body: String::from_utf8_lossy(&body).chars().take(300).collect(),
                });
            }
            serde_json::from_slice(&body).map_err(|e| KubeError::Decode {
                url: path.to_string(),
                reason: e.to_string(),
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| {
                Err(KubeError::Request {
                    url: path.to_string(),
                    reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
                })
            })
    }

    /// Sets one container's CPU limit through the pod's `resize` subresource (in-place resize,
    /// GA in Kubernetes 1.35); the kubelet applies it and reports progress in the pod's status.
    pub async fn resize_cpu_limit(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        limit_millis: Option<u64>,
        resource_version: Option<&str>,
    ) -> Result<(), KubeError> {
        let limit = match limit_millis {
            Some(m) => serde_json::json!(format!("{m}m")),
            None => serde_json::Value::Null,
        };
        let mut patch = serde_json::json!({"spec": {"containers": [
            {"name": container, "resources": {"limits": {"cpu": limit}}}
        ]}});
        // Optimistic concurrency: refused with 409 Conflict when the pod changed since it was
        // read, so a change someone else just made is never overwritten unseen.
        if let Some(rv) = resource_version {
            patch["metadata"] = serde_json::json!({"resourceVersion": rv});
        }
        let path = format!("/api/v1/namespaces/{namespace}/pods/{pod}/resize");
        let body = serde_json::to_vec(&patch).unwrap_or_default();
        self.send::<serde_json::Value>(
            hyper::Method::PATCH,
            &path,
            Some(("application/strategic-merge-patch+json", body)),
        )
        .await
        .map(|_| ())
    }

    /// Records a Kubernetes Event on a pod (`kubectl describe pod` shows it).
    pub async fn pod_event(&self, e: &PodEvent<'_>) -> Result<(), KubeError> {
        let now = headroom_protocol::rfc3339(std::time::SystemTime::now());
        let event = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": format!("{}.headroom-", e.pod), "namespace": e.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": e.namespace,
                               "name": e.pod, "uid": e.uid},
            "reason": e.reason,
            "message": e.message,
            "type": if e.warning { "Warning" } else { "Normal" },
            "source": {"component": "headroom-agent", "host": e.node},
            "reportingComponent": "headroom-agent",
            "reportingInstance": e.node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        });
        let path = format!("/api/v1/namespaces/{}/events", e.namespace);
        let body = serde_json::to_vec(&event).unwrap_or_default();
        self.send::<serde_json::Value>(hyper::Method::POST, &path, Some(("application/json", body)))
            .await
            .map(|_| ())
    }
}

/// An Event about a pod.
pub struct PodEvent<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub reason: &'a str,
    pub message: &'a str,
    pub warning: bool,
}

impl Watcher {
    fn pods_path(&self) -> String {
        format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{}", self.node)
    }

    /// The workload above a pod's controller, asking the API once per controller.
    async fn owner_of(&mut self, namespace: &str, meta: &ObjectMeta) -> Owner {
        let Some(ctrl) = meta.controller() else {
            return Owner {
                kind: "Pod".into(),
                name: meta.name.clone(),
            };
        };
        let parent = match ctrl.kind.as_str() {
            "ReplicaSet" => Some(("apis/apps/v1", "replicasets")),
            "Job" => Some(("apis/batch/v1", "jobs")),
            _ => None,
        };
        let Some((group, resource)) = parent else {
            return Owner {
                kind: ctrl.kind.clone(),
                name: ctrl.name.clone(),
            };
        };
        let key = (namespace.to_string(), ctrl.kind.clone(), ctrl.name.clone());
        if let Some(o) = self.owners.get(&key) {
            return o.clone();
        }
        let path = format!("/{group}/namespaces/{namespace}/{resource}/{}", ctrl.name);
        let owner = match self.api.get_json::<Object>(&path).await {
            Ok(obj) => match obj.metadata.controller() {
                Some(up) => Owner {
                    kind: up.kind.clone(),
                    name: up.name.clone(),
                },
                None => Owner {
                    kind: ctrl.kind.clone(),
                    name: ctrl.name.clone(),
                },
            },
            Err(e) => {
                // Without `get` on the controller: a Deployment's ReplicaSet is named
                // `<deployment>-<pod-template-hash>`, and the pod carries that hash.
                tracing::debug!(error = %e, "cannot read a pod's controller; naming its owner from the template hash");
                match (ctrl.kind.as_str(), meta.labels.get("pod-template-hash")) {
                    ("ReplicaSet", Some(hash)) => ctrl
                        .name
                        .strip_suffix(&format!("-{hash}"))
                        .map(|d| Owner {
                            kind: "Deployment".into(),
                            name: d.to_string(),
                        })
                        .unwrap_or(Owner {
                            kind: ctrl.kind.clone(),
                            name: ctrl.name.clone(),
                        }),
                    _ => Owner {
                        kind: ctrl.kind.clone(),
                        name: ctrl.name.clone(),
                    },
                }
            }
        };
        self.owners.insert(key, owner.clone());
        owner
    }

    async fn pod_info(&mut self, pod: Pod) -> Option<PodInfo> {
        let namespace = pod.metadata.namespace.clone()?;
        let owner = self.owner_of(&namespace, &pod.metadata).await;
        let info = pod_info(pod, namespace, owner);
        for e in &info.annotation_errors {
            let what = format!("{}/{}: {e}", info.namespace, info.name);
            if self.logged.insert(what.clone()) {
                tracing::warn!(pod = %what, "pod annotation ignored");
            }
        }
        Some(info)
    }
}

fn pod_info(pod: Pod, namespace: String, owner: Owner) -> PodInfo {
    let containers = pod
        .status
        .container_statuses
        .iter()
        .chain(&pod.status.init_container_statuses)
        .chain(&pod.status.ephemeral_container_statuses)
        .filter_map(|c| {
            let id = c.container_id.as_deref()?;
            let id = id.split_once("://").map_or(id, |(_, id)| id);
            Some((id.to_string(), c.name.clone()))
        })
        .collect();
    let mut annotation_errors = Vec::new();
    let annotations = &pod.metadata.annotations;
    let manage = annotations
        .get(ANNOTATION_MANAGE)
        .and_then(|v| match v.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => {
                annotation_errors.push(format!(
                    "{ANNOTATION_MANAGE}: {v:?} is neither \"true\" nor \"false\""
                ));
                None
            }
        });
    let latency_slo_s = annotations
        .get(ANNOTATION_LATENCY_SLO)
        .and_then(|v| match parse_seconds(v) {
            Some(s) if (1e-6..=3600.0).contains(&s) => Some((s * 1e6).round() as u64),
            _ => {
                annotation_errors.push(format!(
                    "{ANNOTATION_LATENCY_SLO}: {v:?} is not a duration from 1us to 1h (\"50ms\", \"0.2s\")"
                ));
                None
            }
        });
    let cpu = |r: &Option<ResourceList>| {
        r.as_ref()
            .and_then(|l| l.cpu.as_deref())
            .and_then(parse_cpu_millis)
    };
    let spec_cpu = pod
        .spec
        .containers
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                CpuResources {
                    request_millis: cpu(&c.resources.requests),
                    limit_millis: cpu(&c.resources.limits),
                },
            )
        })
        .collect();
    let applied_cpu_limit = pod
        .status
        .container_statuses
        .iter()
        .filter_map(|c| Some((c.name.clone(), cpu(&c.resources.as_ref()?.limits))))
        .collect();
    let resize = pod
        .status
        .conditions
        .iter()
        .find(|c| {
            (c.kind == "PodResizePending" || c.kind == "PodResizeInProgress") && c.status == "True"
        })
        .map(|c| (c.kind.clone(), c.reason.clone().unwrap_or_default()));
    let note = |k: &str| {
        pod.metadata
            .annotations
            .get(k)
            .map(|v| v.trim().to_string())
    };
    let scrape = PodScrape {
        ip: pod.status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()),
        scrape: note("prometheus.io/scrape").and_then(|v| match v.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }),
        port: note("prometheus.io/port").and_then(|v| v.parse().ok().filter(|p| *p > 0)),
        path: note("prometheus.io/path").filter(|p| p.starts_with('/')),
        target_waiting_per_replica: note("headroom.dev/target-waiting-per-replica"),
        target_kv_cache_ratio: note("headroom.dev/target-kv-cache-ratio"),
        target_tokens_per_second: note("headroom.dev/target-tokens-per-second"),
        target_concurrency_per_replica: note("headroom.dev/target-concurrency-per-replica"),
    };
    PodInfo {
        uid: pod.metadata.uid,
        resource_version: pod.metadata.resource_version,
        namespace,
        name: pod.metadata.name,
        owner,
        containers,
        manage,
        latency_slo_us: latency_slo_s,
        annotation_errors,
        spec_cpu,
        applied_cpu_limit,
        resize,
        scrape,
    }
}

/// List, then watch from the list's resource version; relist when the watch expires (410) or
/// fails; back off exponentially (1 s to 60 s) while the API server cannot be reached.
async fn watch_pods(mut client: Watcher, dir: Arc<PodDirectory>) {
    let mut backoff = Duration::from_secs(1);
    let mut logged_failure = false;
    loop {
        match list_and_watch(&mut client, &dir).await {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) => {
                if !logged_failure {
                    tracing::warn!(error = %e, retry_s = backoff.as_secs(), "cannot watch pods through the Kubernetes API; naming containers from kubelet's log directory meanwhile");
                    logged_failure = true;
                }
                dir.failed(e.to_string());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                continue;
            }
        }
        if logged_failure {
            tracing::info!("watching pods through the Kubernetes API again");
            logged_failure = false;
        }
    }
}

async fn list_and_watch(client: &mut Watcher, dir: &PodDirectory) -> Result<(), KubeError> {
    let path = client.pods_path();
    let list: PodList = client.api.get_json(&path).await?;
    let mut pods = Vec::with_capacity(list.items.len());
    for pod in list.items {
        if let Some(p) = client.pod_info(pod).await {
            pods.push(p);
        }
    }
    let first = dir.status().state != "synced";
    dir.replace(pods);
    if first {
        tracing::info!(
            pods = dir.status().pods,
            "this node's pods listed from the Kubernetes API"
        );
    }
    let mut version = list.metadata.resource_version.unwrap_or_default();
    loop {
        let watch = format!(
            "{path}&watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_TIMEOUT_S}&resourceVersion={version}"
        );
        let req = client.api.request(hyper::Method::GET, &watch, None)?;
        let resp = client
            .api
            .http
            .request(req)
            .await
            .map_err(|e| KubeError::Request {
                url: watch.clone(),
                reason: error_chain(&e),
            })?;
        if !resp.status().is_success() {
            return Err(KubeError::Status {
                url: watch,
                status: resp.status(),
                body: String::new(),
            });
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let idle = Duration::from_secs(WATCH_TIMEOUT_S + 30);
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => break, // a silent watch: resume from the last version
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(KubeError::Request {
                        url: watch,
                        reason: e.to_string(),
                    });
                }
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event: WatchEvent =
                    serde_json::from_slice(&line).map_err(|e| KubeError::Decode {
                        url: watch.clone(),
                        reason: e.to_string(),
                    })?;
                match event.kind.as_str() {
                    "ERROR" => {
                        // 410 Gone: the version is too old; a relist starts over.
                        return Ok(());
                    }
                    "BOOKMARK" => {
                        if let Some(v) = event
                            .object
                            .get("metadata")
                            .and_then(|m| m.get("resourceVersion").and_then(|v| v.as_str()))
                        {
                            version = v.to_string();
                        }
                    }
                    kind => {
                        let pod: Pod = serde_json::from_value(event.object).map_err(|e| {
                            KubeError::Decode {
                                url: watch.clone(),
                                reason: e.to_string(),
                            }
                        })?;
                        if let Some(v) = &pod.metadata.resource_version {
                            version = v.clone();
                        }
                        if kind == "DELETED" {
                            dir.remove(&pod.metadata.uid);
                        } else if let Some(p) = client.pod_info(pod).await {
                            dir.upsert(p);
                        }
                    }
                }
            }
        }
    }
}

// The few fields of the API's objects the agent reads.

#[derive(Debug, Deserialize)]
struct ObjectMeta {
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    uid: String,
    #[serde(rename = "resourceVersion")]
    resource_version: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default, rename = "ownerReferences")]
    owner_references: Vec<OwnerReference>,
}

impl ObjectMeta {
    fn controller(&self) -> Option<&OwnerReference> {
        self.owner_references.iter().find(|o| o.controller)
    }
}

#[derive(Debug, Deserialize)]
struct OwnerReference {
    kind: String,
    name: String,
    #[serde(default)]
    controller: bool,
}

#[derive(Debug, Deserialize)]
struct Object {
    metadata: ObjectMeta,
}

#[derive(Debug, Deserialize)]
struct Pod {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
struct PodSpec {
    #[serde(default)]
    containers: Vec<ContainerSpec>,
}

#[derive(Debug, Deserialize)]
struct ContainerSpec {
    name: String,
    #[serde(default)]
    resources: Resources,
}

#[derive(Debug, Default, Deserialize)]
struct Resources {
    requests: Option<ResourceList>,
    limits: Option<ResourceList>,
}

#[derive(Debug, Default, Deserialize)]
struct ResourceList {
    cpu: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Condition {
    #[serde(rename = "type")]
    kind: String,
    status: String,
    reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PodStatus {
    #[serde(default, rename = "containerStatuses")]
    container_statuses: Vec<ContainerStatus>,
    #[serde(default, rename = "initContainerStatuses")]
    init_container_statuses: Vec<ContainerStatus>,
    #[serde(default, rename = "ephemeralContainerStatuses")]
    ephemeral_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    conditions: Vec<Condition>,
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ContainerStatus {
    name: String,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
    /// What the kubelet applied (in-place resize reports it here).
    resources: Option<Resources>,
}

#[derive(Debug, Deserialize)]
struct ListMeta {
    #[serde(rename = "resourceVersion")]
    resource_version: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PodList {
    metadata: ListMeta,
    items: Vec<Pod>,
}

#[derive(Debug, Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = r#"{
      "metadata": {"name": "web-7d4b9c8f6d-x2k4p", "namespace": "shop", "uid": "u1",
        "resourceVersion": "42", "labels": {"pod-template-hash": "7d4b9c8f6d"},
        "annotations": {"headroom.dev/manage": "true", "prometheus.io/port": "8000",
          "prometheus.io/path": "/stats", "headroom.dev/target-waiting-per-replica": "6"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
          "name": "web-7d4b9c8f6d", "uid": "rs1", "controller": true}]},
      "spec": {"nodeName": "n1"},
      "status": {"podIP": "10.244.0.17", "containerStatuses": [
        {"name": "app", "containerID": "containerd://aaaa"},
        {"name": "sidecar", "containerID": "containerd://bbbb"},
        {"name": "starting"}]}
    }"#;

    #[test]
    fn annotations_name_management_and_the_slo_and_bad_values_are_named() {
        let with = |manage: &str, slo: &str| {
            let mut pod: Pod = serde_json::from_str(POD).unwrap();
            pod.metadata
                .annotations
                .insert(ANNOTATION_MANAGE.into(), manage.into());
            pod.metadata
                .annotations
                .insert(ANNOTATION_LATENCY_SLO.into(), slo.into());
            let owner = Owner {
                kind: "Pod".into(),
                name: "p".into(),
            };
            pod_info(pod, "shop".into(), owner)
        };
        let ok = with("false", "50ms");
        assert_eq!(
            (ok.manage, ok.latency_slo_us, ok.annotation_errors.len()),
            (Some(false), Some(50_000), 0)
        );
        assert_eq!(with("true", "0.2s").latency_slo_us, Some(200_000));
        assert_eq!(with("true", "1").latency_slo_us, Some(1_000_000));
        let bad = with("yes", "fast");
        assert_eq!((bad.manage, bad.latency_slo_us), (None, None));
        assert_eq!(
            bad.annotation_errors.len(),
            2,
            "{:?}",
            bad.annotation_errors
        );
        assert!(bad.annotation_errors[0].contains("headroom.dev/manage: \"yes\""));
        assert!(bad.annotation_errors[1].contains("headroom.dev/latency-slo: \"fast\""));
        for out_of_range in ["0", "-5ms", "2h", "NaN", "inf"] {
            let p = with("true", out_of_range);
            assert_eq!(p.latency_slo_us, None, "{out_of_range}");
            assert_eq!(p.annotation_errors.len(), 1, "{out_of_range}");
        }
    }

    #[test]
    fn pods_decode_with_containers_and_annotations() {
        let pod: Pod = serde_json::from_str(POD).unwrap();
        assert_eq!(pod.metadata.controller().unwrap().kind, "ReplicaSet");
        let info = pod_info(
            pod,
            "shop".into(),
            Owner {
                kind: "Deployment".into(),
                name: "web".into(),
            },
        );
        assert_eq!(info.containers.len(), 2);
        assert_eq!(info.containers["aaaa"], "app");
        assert_eq!(info.containers["bbbb"], "sidecar");
        assert_eq!(info.manage, Some(true));
        assert_eq!(info.scrape.ip, "10.244.0.17".parse().ok());
        assert_eq!(info.scrape.port, Some(8000));
        assert_eq!(info.scrape.path.as_deref(), Some("/stats"));
        assert_eq!(info.scrape.scrape, None);
        let targets = crate::sample::engines::targets_of(
            &crate::config::EnginesConfig::default(),
            "/kubepods/x",
            &info.scrape,
        );
        assert_eq!(targets.waiting_per_replica, 6.0);
        assert_eq!(targets.kv_cache_ratio, 0.8);
        let d = PodDirectory::from_pods([info]);
        assert_eq!(d.pod("u1").unwrap().owner.name, "web");
        assert_eq!(d.status().pods, 1);
        d.remove("u1");
        assert!(d.pod("u1").is_none());
    }

    #[test]
    fn watch_events_and_lists_decode() {
        let ev: WatchEvent =
            serde_json::from_str(&format!(r#"{{"type":"MODIFIED","object":{POD}}}"#)).unwrap();
        assert_eq!(ev.kind, "MODIFIED");
        let list: PodList = serde_json::from_str(&format!(
            r#"{{"kind":"PodList","metadata":{{"resourceVersion":"7"}},"items":[{POD}]}}"#
        ))
        .unwrap();
        assert_eq!(list.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(list.items.len(), 1);
        let bare: Pod =
            serde_json::from_str(r#"{"metadata":{"name":"solo","namespace":"x","uid":"u2"}}"#)
                .unwrap();
        assert!(bare.metadata.controller().is_none());
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_cpu_millis("250m"), Some(250));
        assert_eq!(parse_cpu_millis("1.5"), Some(1500));
        assert_eq!(parse_cpu_millis("2"), Some(2000));
        assert_eq!(parse_cpu_millis("lots"), None);
    }

    #[test]
    fn resize_state_and_limits_decode() {
        let pod: Pod = serde_json::from_str(
            r#"{"metadata":{"name":"p","namespace":"x","uid":"u"},
                "spec":{"containers":[{"name":"c","resources":{"requests":{"cpu":"100m"},"limits":{"cpu":"1"}}}]},
                "status":{"conditions":[{"type":"PodResizePending","status":"True","reason":"Infeasible"}],
                          "containerStatuses":[{"name":"c","containerID":"containerd://i","resources":{"limits":{"cpu":"500m"}}}]}}"#,
        )
        .unwrap();
        let info = pod_info(
            pod,
            "x".into(),
            Owner {
                kind: "Pod".into(),
                name: "p".into(),
            },
        );
        assert_eq!(
            info.spec_cpu["c"],
            CpuResources {
                request_millis: Some(100),
                limit_millis: Some(1000)
            }
        );
        assert_eq!(info.applied_cpu_limit["c"], Some(500));
        assert_eq!(
            info.resize,
            Some(("PodResizePending".into(), "Infeasible".into()))
        );
    }
}
