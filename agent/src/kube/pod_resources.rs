//! Which devices the kubelet gave each container, from its pod-resources API (`List` and
//! `GetAllocatableResources` over the kubelet's Unix socket, the way dcgm-exporter maps GPUs to
//! pods). Polled on the I/O runtime; a failed call drops the connection and the next poll dials
//! the socket path again, so a restarted kubelet (a new socket at the same path; mount the
//! folder, not the socket) is picked up. The last good answer is kept while the kubelet is away:
//! devices stay allocated to running containers whether or not the kubelet is answering.

#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
#[rustfmt::skip]
mod proto {
    include!("podresources_v1.rs");
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint, Uri};

use proto::pod_resources_lister_client::PodResourcesListerClient;
use proto::{AllocatableResourcesRequest, ContainerDevices, ListPodResourcesRequest};

const REFRESH: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One device the kubelet allocated to one container.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DeviceOwner {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// The extended resource, e.g. `nvidia.com/gpu` or `nvidia.com/mig-1g.18gb`.
    pub resource: String,
    /// The id the device plugin advertised: a GPU or MIG UUID, `UUID::N` for a time-sliced replica.
    pub device_id: String,
}

/// The NVML UUID behind a device plugin's device id: the NVIDIA device plugin names a
/// time-sliced (or MPS) replica `UUID::N`; whole GPUs and MIG devices are their UUID.
pub fn device_uuid(device_id: &str) -> &str {
    device_id
        .split_once("::")
        .map_or(device_id, |(uuid, _)| uuid)
}

/// Where the pod-resources API stands, for `/v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PodResourcesStatus {
    /// `off` (disabled), `absent` (no socket: not a kubelet node, or the folder is not mounted),
    /// `connecting`, `ok` or `error`.
    pub state: &'static str,
    pub socket: PathBuf,
    /// Device ids allocated to containers, and advertised by device plugins, at the last answer.
    pub devices_allocated: usize,
    pub devices_allocatable: usize,
    /// Unix seconds of the last answer.
    pub last_answer_at: Option<f64>,
    pub error: Option<String>,
}

/// Device allocations on this node, kept current by [`start`]; read by the sampling loop.
#[derive(Debug)]
pub struct DeviceAllocations {
    /// UUID (see [`device_uuid`]) → the containers holding it.
    by_uuid: RwLock<Arc<BTreeMap<String, Vec<DeviceOwner>>>>,
    status: RwLock<PodResourcesStatus>,
}

impl DeviceAllocations {
    fn new(socket: &Path, state: &'static str) -> DeviceAllocations {
        DeviceAllocations {
            by_uuid: RwLock::new(Arc::new(BTreeMap::new())),
            status: RwLock::new(PodResourcesStatus {
                state,
                socket: socket.to_path_buf(),
                devices_allocated: 0,
                devices_allocatable: 0,
                last_answer_at: None,
                error: None,
            }),
        }
    }

    /// Allocations filled by hand (tests, and callers that learn them elsewhere).
    pub fn from_owners(owners: impl IntoIterator<Item = DeviceOwner>) -> DeviceAllocations {
        let d = DeviceAllocations::new(Path::new(""), "ok");
        d.replace(index(owners));
        d
    }

    /// UUID → the containers holding that device (or a MIG instance or replica of it).
    pub fn by_uuid(&self) -> Arc<BTreeMap<String, Vec<DeviceOwner>>> {
        self.by_uuid
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn status(&self) -> PodResourcesStatus {
        self.status
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, m: BTreeMap<String, Vec<DeviceOwner>>) {
        *self
            .by_uuid
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(m);
    }

    fn set_status(&self, f: impl FnOnce(&mut PodResourcesStatus)) {
        f(&mut self
            .status
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

fn index(owners: impl IntoIterator<Item = DeviceOwner>) -> BTreeMap<String, Vec<DeviceOwner>> {
    let mut m: BTreeMap<String, Vec<DeviceOwner>> = BTreeMap::new();
    for o in owners {
        m.entry(device_uuid(&o.device_id).to_string())
            .or_default()
            .push(o);
    }
    for v in m.values_mut() {
        v.sort();
        v.dedup();
    }
    m
}

/// Every device id in a `List` answer, with the container that holds it.
fn owners(list: proto::ListPodResourcesResponse) -> Vec<DeviceOwner> {
    let mut out = Vec::new();
    for pod in list.pod_resources {
        for c in pod.containers {
            for d in c.devices {
                for id in d.device_ids {
                    out.push(DeviceOwner {
                        namespace: pod.namespace.clone(),
                        pod: pod.name.clone(),
                        container: c.name.clone(),
                        resource: d.resource_name.clone(),
                        device_id: id,
                    });
                }
            }
        }
    }
    out
}

fn device_count(devices: &[ContainerDevices]) -> usize {
    devices.iter().map(|d| d.device_ids.len()).sum()
}

/// Starts polling `socket` on `runtime`. A missing socket is not an error until the kubelet has
/// answered once (a node without a kubelet has none); it is looked for again at every poll.
pub fn start(socket: &Path, runtime: &tokio::runtime::Handle) -> Arc<DeviceAllocations> {
    let d = Arc::new(DeviceAllocations::new(socket, "connecting"));
    runtime.spawn(poll(socket.to_path_buf(), d.clone()));
    d
}

/// Allocations that stay empty: the API is turned off by configuration.
pub fn off(socket: &Path) -> Arc<DeviceAllocations> {
    Arc::new(DeviceAllocations::new(socket, "off"))
}

async fn poll(socket: PathBuf, d: Arc<DeviceAllocations>) {
    let mut client: Option<PodResourcesListerClient<Channel>> = None;
    let mut answered = false;
    // What was last logged, so each change of state is logged once.
    let mut logged: Option<&'static str> = None;
    loop {
        if client.is_none() && !socket.exists() && !answered {
            d.set_status(|s| {
                s.state = "absent";
                s.error = Some(format!("no socket at {}", socket.display()));
            });
            if logged != Some("absent") {
                tracing::info!(socket = %socket.display(), "no kubelet pod-resources socket; GPUs are attributed to containers from NVML processes only");
                logged = Some("absent");
            }
            tokio::time::sleep(REFRESH).await;
            continue;
        }
        if client.is_none() {
            client = Some(PodResourcesListerClient::new(channel(&socket)));
        }
        let Some(c) = client.as_mut() else { continue };
        match query(c).await {
            Ok((owners, allocatable)) => {
                let allocated = owners.len();
                d.replace(index(owners));
                d.set_status(|s| {
                    s.state = "ok";
                    s.devices_allocated = allocated;
                    s.devices_allocatable = allocatable;
                    s.last_answer_at = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .ok()
                        .map(|t| t.as_secs_f64());
                    s.error = None;
                });
                if logged != Some("ok") {
                    tracing::info!(socket = %socket.display(), allocated, allocatable, "kubelet pod-resources API answering; GPUs are attributed to the containers the kubelet gave them to");
                    logged = Some("ok");
                }
                answered = true;
            }
            Err(e) => {
                client = None;
                let msg = format!("{}: {e}", socket.display());
                d.set_status(|s| {
                    s.state = "error";
                    s.error = Some(msg.clone());
                });
                if logged != Some("error") {
                    tracing::warn!(error = %msg, "kubelet pod-resources API unavailable; keeping the last allocations and retrying every {}s", REFRESH.as_secs());
                    logged = Some("error");
                }
            }
        }
        tokio::time::sleep(REFRESH).await;
    }
}

/// A channel that dials the Unix socket on each (re)connect; the URI is only a placeholder.
fn channel(socket: &Path) -> Channel {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://kubelet.pod-resources")
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(&path)
                    .await
                    .map(TokioIo::new)
            }
        }))
}

async fn query(
    c: &mut PodResourcesListerClient<Channel>,
) -> Result<(Vec<DeviceOwner>, usize), String> {
    let list = c
        .list(ListPodResourcesRequest {})
        .await
        .map_err(|s| describe(&s, "List"))?
        .into_inner();
    // Older kubelets (and ones with the feature gate off) lack it; allocations still work.
    let allocatable = match c
        .get_allocatable_resources(AllocatableResourcesRequest {})
        .await
    {
        Ok(r) => device_count(&r.into_inner().devices),
        Err(s) if s.code() == tonic::Code::Unimplemented => 0,
        Err(s) => return Err(describe(&s, "GetAllocatableResources")),
    };
    Ok((owners(list), allocatable))
}

fn describe(s: &tonic::Status, call: &str) -> String {
    let mut msg = format!("{call}: {:?}: {}", s.code(), s.message());
    let mut source = std::error::Error::source(s);
    // tonic repeats the innermost cause at each layer: name each once.
    while let Some(e) = source {
        let e_text = e.to_string();
        if !msg.contains(&e_text) {
            msg.push_str(&format!(": {e_text}"));
        }
        source = e.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::proto::*;
    use super::*;

    fn devices(resource: &str, ids: &[&str]) -> ContainerDevices {
        ContainerDevices {
            resource_name: resource.into(),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
            topology: None,
        }
    }

    fn container(name: &str, devs: Vec<ContainerDevices>) -> ContainerResources {
        ContainerResources {
            name: name.into(),
            devices: devs,
            ..Default::default()
        }
    }

    #[test]
    fn whole_gpus_mig_devices_and_time_sliced_replicas_map_to_their_uuid() {
        let list = ListPodResourcesResponse {
            pod_resources: vec![
                PodResources {
                    name: "trainer-0".into(),
                    namespace: "ml".into(),
                    containers: vec![
                        container("main", vec![devices("nvidia.com/gpu", &["GPU-aaa"])]),
                        container("sidecar", vec![]),
                    ],
                },
                PodResources {
                    name: "llm-1".into(),
                    namespace: "serve".into(),
                    containers: vec![container(
                        "engine",
                        vec![
                            devices("nvidia.com/gpu.shared", &["GPU-bbb::0", "GPU-bbb::3"]),
                            devices("nvidia.com/mig-1g.18gb", &["MIG-ccc"]),
                        ],
                    )],
                },
                PodResources {
                    name: "llm-2".into(),
                    namespace: "serve".into(),
                    containers: vec![container(
                        "engine",
                        vec![devices("nvidia.com/gpu.shared", &["GPU-bbb::1"])],
                    )],
                },
            ],
        };
        let m = index(owners(list));
        let who = |uuid: &str| -> Vec<(String, String, String)> {
            m.get(uuid)
                .map(|v| {
                    v.iter()
                        .map(|o| (o.namespace.clone(), o.pod.clone(), o.container.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let t = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        assert_eq!(who("GPU-aaa"), vec![t("ml", "trainer-0", "main")]);
        // Two replicas held by one container, one by another: both owners, each once per replica.
        assert_eq!(
            who("GPU-bbb"),
            vec![
                t("serve", "llm-1", "engine"),
                t("serve", "llm-1", "engine"),
                t("serve", "llm-2", "engine")
            ]
        );
        assert_eq!(m["GPU-bbb"][0].device_id, "GPU-bbb::0");
        assert_eq!(who("MIG-ccc"), vec![t("serve", "llm-1", "engine")]);
        assert_eq!(m["MIG-ccc"][0].resource, "nvidia.com/mig-1g.18gb");
        assert_eq!(m.len(), 3, "{m:?}");
    }

    #[test]
    fn device_uuid_strips_only_the_replica_suffix() {
        assert_eq!(device_uuid("GPU-1f2e"), "GPU-1f2e");
        assert_eq!(device_uuid("GPU-1f2e::7"), "GPU-1f2e");
        assert_eq!(device_uuid("MIG-9a0b"), "MIG-9a0b");
        assert_eq!(device_uuid(""), "");
    }

    #[tokio::test]
    async fn a_missing_socket_is_reported_absent_and_sampling_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("kubelet.sock");
        let d = start(&sock, &tokio::runtime::Handle::current());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = d.status();
        assert_eq!(s.state, "absent", "{s:?}");
        assert!(
            s.error
                .as_deref()
                .is_some_and(|e| e.contains("kubelet.sock"))
        );
        assert!(d.by_uuid().is_empty());
    }

    #[tokio::test]
    async fn a_socket_that_does_not_speak_grpc_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("kubelet.sock");
        // Accepts and closes every connection: like a kubelet dying mid-call.
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        });
        let d = start(&sock, &tokio::runtime::Handle::current());
        let mut s = d.status();
        for _ in 0..100 {
            if s.state == "error" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            s = d.status();
        }
        assert_eq!(s.state, "error", "{s:?}");
        let e = s.error.unwrap_or_default();
        assert!(e.contains("kubelet.sock") && e.contains("List"), "{e}");
    }
}
