#!/usr/bin/env bash
# A single-node Kubernetes cluster on this machine, from real components: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet and kube-proxy (Kubernetes built from its Go
# modules at one pinned release), containerd with runc and the CNI bridge plugin, and CoreDNS.
# Then headroom's image is assembled from the locally built binary, imported into containerd, and
# deploy/ is applied through the kustomize overlay in tests/kube/overlay.
#
#   sudo scripts/kube-up.sh           # prints `export KUBECONFIG=...` as its last line
#   sudo scripts/kube-down.sh         # stops it all and leaves the host as it was
#
# Idempotent: a second run reuses the running cluster (re-importing the image when the binary
# changed). Environment:
#   HEADROOM_BIN          the headroom binary to ship (default: cargo build --release --locked)
#   HEADROOM_KUBE_CACHE   where built binaries are cached by release (default /var/cache/headroom/kube)
#   HEADROOM_KUBE_NODE_IP the node's address (default: the address of the default route's interface)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
KUBE_VERSION=v1.35.4
COREDNS_VERSION=v1.12.4
CACHE=${HEADROOM_KUBE_CACHE:-/var/cache/headroom/kube}
STATE=/var/lib/headroom-kube
RUN=/run/headroom-kube
LOCK=/run/headroom-kube.lock
POD_CIDR=10.244.0.0/16
NODE_POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
DNS_SERVICE_IP=10.96.0.10
ETCD_PORT=12379
BRIDGE=hr-cni0

say() { echo "kube-up: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it starts a kubelet, containerd and network namespaces)"

# One cluster at a time: a second kube-up (or a kube-down) waits for none and refuses at once.
mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
flock -n 9 || die "another kube-up or kube-down is running (lock $LOCK held by pid $(fuser "$LOCK" 2>/dev/null | tr -s ' ' || echo '?'))"

# --- what the host must have ------------------------------------------------------------------
missing=()
need() { # need TOOL DEBIAN-PACKAGE
  command -v "$1" >/dev/null 2>&1 || missing+=("$1 (Debian package $2)")
}
need go golang-go
need etcd etcd-server
need containerd containerd
need containerd-shim-runc-v2 containerd
need ctr containerd
need runc runc
need iptables iptables
need iptables-save iptables
need conntrack conntrack
need openssl openssl
need curl curl
need python3 python3
need ip iproute2
need flock util-linux
need ldd libc-bin
need busybox busybox-static
need gcc gcc
for plugin in bridge host-local loopback portmap; do
  [ -x "/usr/lib/cni/$plugin" ] || missing+=("/usr/lib/cni/$plugin (Debian package containernetworking-plugins)")
done
[ -d /sys/fs/cgroup ] || missing+=("a cgroup file system at /sys/fs/cgroup")
if [ ${#missing[@]} -gt 0 ]; then
  say "missing on this machine:"
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || die "missing static libc for the pause image (Debian package libc6-dev)"

if [ -z "${HEADROOM_KUBE_NODE_IP:-}" ]; then
  dev=$(ip -4 route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')
  [ -n "$dev" ] || die "no default route to take the node address from; set HEADROOM_KUBE_NODE_IP"
  HEADROOM_KUBE_NODE_IP=$(ip -4 -o addr show dev "$dev" | awk '{split($4, a, "/"); print a[1]; exit}')
  [ -n "$HEADROOM_KUBE_NODE_IP" ] || die "interface $dev has no IPv4 address; set HEADROOM_KUBE_NODE_IP"
fi
NODE_IP=$HEADROOM_KUBE_NODE_IP
NODE_NAME=$(hostname | tr '[:upper:]' '[:lower:]')

BIN=$CACHE/$KUBE_VERSION/bin
DNS_BIN=$CACHE/coredns-$COREDNS_VERSION/bin
KUBECTL="$BIN/kubectl --kubeconfig $STATE/admin.kubeconfig"

# --- binaries, built once per release ---------------------------------------------------------
build_cached() { # build_cached DIR MODULE-DIR LDFLAGS PACKAGE...
  local dir=$1 module=$2 ldflags=$3
  shift 3
  if [ -f "$dir/SHA256SUMS" ] && (cd "$dir" && sha256sum --quiet -c SHA256SUMS) 2>/dev/null; then
    return
  fi
  say "building $* into $dir (once per release; minutes on 2 cores)"
  rm -rf "$dir" && mkdir -p "$dir"
  local started=$SECONDS
  (cd "$module" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "$ldflags" -o "$dir/" "$@") \
    || die "building $* failed (go: $(go version))"
  (cd "$dir" && sha256sum -- * > SHA256SUMS)
  say "built in $((SECONDS - started)) s"
}
kube_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION"
kube_ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=35"
kube_ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
kube_ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
build_cached "$BIN" "$REPO/tests/kube/build" "$kube_ldflags" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl
build_cached "$DNS_BIN" "$REPO/tests/kube/coredns" "-s -w" github.com/coredns/coredns

if [ -z "${HEADROOM_BIN:-}" ]; then
  say "building headroom (cargo build --release --locked -p headroom)"
  (cd "$REPO" && cargo build --release --locked -p headroom) || die "building headroom failed"
  HEADROOM_BIN=$REPO/target/release/headroom
fi
[ -x "$HEADROOM_BIN" ] || die "HEADROOM_BIN=$HEADROOM_BIN is not an executable file"

# --- processes ----------------------------------------------------------------------------------
alive() { [ -f "$STATE/pids/$1" ] && kill -0 "$(cat "$STATE/pids/$1")" 2>/dev/null; }
start() { # start NAME COMMAND...
  local name=$1
  shift
  alive "$name" && return
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null 9>&- &
  echo $! > "$STATE/pids/$name"
}
wait_for() { # wait_for SECONDS WHAT COMMAND...
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      say "timed out after ${limit} s waiting for $what"
      for log in "$STATE"/logs/*.log; do
        say "--- last lines of $log"
        tail -n 15 "$log" >&2
      done
      exit 1
    fi
    sleep 1
  done
}
port_free_or_ours() { # the port is free, or held by a process this cluster started
  local port=$1 pid
  pid=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2 || true)
  [ -z "$pid" ] && return 0
  grep -qx "$pid" <(cat "$STATE"/pids/* 2>/dev/null) && return 0
  die "port $port is in use by $(cat /proc/"$pid"/comm 2>/dev/null || echo "pid $pid"); stop it or run kube-down"
}

# A cluster some of whose components still run is reused as it is (certificates included);
# whatever stopped is started again below.
running=false
for component in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy; do
  alive "$component" && running=true
done
if $running; then
  say "a cluster is already running; reusing it"
fi
for port in "$ETCD_PORT" 6443 10250 10248 10256 10257 10259; do port_free_or_ours "$port"; done

# --- first start: host record, certificates, configuration --------------------------------------
if ! $running; then
  if [ -d "$STATE/pids" ] && ls "$STATE"/pids/* >/dev/null 2>&1; then
    say "a previous cluster stopped without kube-down; cleaning up first"
    flock -u 9
    "$REPO/scripts/kube-down.sh"
    flock -n 9 || die "lock $LOCK taken while cleaning up"
  fi
  mkdir -p "$STATE"/{pki,logs,pids,etcd,host} "$RUN/cni"
  # What kube-down must give back: sysctls the node components change, paths they create, and
  # the firewall as it was.
  for key in net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables vm.overcommit_memory \
    vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes; do
    value=$(sysctl -n "$key" 2>/dev/null) && echo "$key=$value"
  done > "$STATE/host/sysctl"
  for path in /var/lib/kubelet /var/log/pods /var/log/containers /var/lib/headroom /run/containerd \
    /run/nvidia /etc/cni /opt/cni /var/run/netns; do
    [ -e "$path" ] || echo "$path"
  done > "$STATE/host/created"
  iptables-save > "$STATE/host/iptables" 2>/dev/null || true
  ip6tables-save > "$STATE/host/ip6tables" 2>/dev/null || true

  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1

  say "generating certificates in $STATE/pki"
  pki=$STATE/pki
  key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
  ca() { # ca NAME CN
    key "$pki/$1.key"
    openssl req -x509 -new -key "$pki/$1.key" -subj "/CN=$2" -days 2 -out "$pki/$1.crt" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  }
  cert() { # cert NAME SUBJECT USAGE [SANS] [CA]
    local name=$1 subj=$2 usage=$3 sans=${4:-} signer=${5:-ca}
    key "$pki/$name.key"
    local ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$usage"
    [ -n "$sans" ] && ext+=$'\n'"subjectAltName=$sans"
    openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
    openssl x509 -req -in "$pki/$name.csr" -CA "$pki/$signer.crt" -CAkey "$pki/$signer.key" \
      -CAcreateserial -days 2 -out "$pki/$name.crt" -extfile <(echo "$ext") 2>/dev/null
    rm -f "$pki/$name.csr"
  }
  ca ca headroom-test-ca
  ca front-proxy-ca headroom-test-front-proxy-ca
  cert apiserver "/CN=kube-apiserver" serverAuth \
    "IP:$NODE_IP,IP:127.0.0.1,IP:$API_SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  cert admin "/O=system:masters/CN=kubernetes-admin" clientAuth
  cert controller-manager "/CN=system:kube-controller-manager" clientAuth
  cert scheduler "/CN=system:kube-scheduler" clientAuth
  cert kube-proxy "/CN=system:kube-proxy" clientAuth
  cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
  cert kubelet-serving "/CN=$NODE_NAME" serverAuth "IP:$NODE_IP,IP:127.0.0.1,DNS:$NODE_NAME,DNS:localhost"
  cert front-proxy-client "/CN=front-proxy-client" clientAuth "" front-proxy-ca
  key "$pki/sa.key"
  openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null

  kubeconfig() { # kubeconfig NAME CERT
    cat > "$STATE/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: headroom-test
  cluster:
    certificate-authority: $pki/ca.crt
    server: https://127.0.0.1:6443
users:
- name: $2
  user:
    client-certificate: $pki/$2.crt
    client-key: $pki/$2.key
contexts:
- name: headroom-test
  context: {cluster: headroom-test, user: $2}
current-context: headroom-test
EOF
  }
  kubeconfig admin admin
  kubeconfig controller-manager controller-manager
  kubeconfig scheduler scheduler
  kubeconfig kube-proxy kube-proxy
  kubeconfig kubelet kubelet

  cat > "$STATE/containerd.toml" <<EOF
version = 2
root = "$STATE/containerd"
state = "$RUN/containerd"
[grpc]
  address = "$RUN/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:test"
  # Lowering a score below the caller's own needs CAP_SYS_RESOURCE, which sandboxed build
  # machines may not grant; containers then keep the kubelet's ordering at or above ours.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$RUN/cni"
EOF
  cat > "$RUN/cni/10-headroom-test.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "headroom-test",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$NODE_POD_CIDR"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$STATE/cni-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  : > "$STATE/resolv.conf"
  cat > "$STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This host mounts cgroup v1 controllers (hybrid); Kubernetes 1.35 refuses them unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$RUN/containerd/containerd.sock
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
clusterDomain: cluster.local
clusterDNS: [$DNS_SERVICE_IP]
resolvConf: $STATE/resolv.conf
failSwapOn: false
healthzBindAddress: 127.0.0.1
evictionHard: {memory.available: 100Mi, nodefs.available: 2%, imagefs.available: 2%}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
maxPods: 60
EOF
  cat > "$STATE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the host's conntrack and localnet settings as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false}
EOF
fi

# --- the control plane and the node ---------------------------------------------------------------
pki=$STATE/pki
start etcd etcd --name headroom-test --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls http://127.0.0.1:12380 --initial-advertise-peer-urls http://127.0.0.1:12380 \
  --initial-cluster headroom-test=http://127.0.0.1:12380
wait_for 60 etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"

start kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --advertise-address "$NODE_IP" --bind-address 0.0.0.0 --secure-port 6443 \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --client-ca-file "$pki/ca.crt" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$pki/apiserver-kubelet-client.key" --kubelet-certificate-authority "$pki/ca.crt" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction --allow-privileged \
  --requestheader-client-ca-file "$pki/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --proxy-client-cert-file "$pki/front-proxy-client.crt" --proxy-client-key-file "$pki/front-proxy-client.key" \
  --enable-aggregator-routing
wait_for 120 "kube-apiserver" curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
  https://127.0.0.1:6443/readyz

start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key"
start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$STATE/scheduler.kubeconfig" \
  --authentication-kubeconfig "$STATE/scheduler.kubeconfig" --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false

start containerd containerd --config "$STATE/containerd.toml"
wait_for 60 containerd ctr --address "$RUN/containerd/containerd.sock" version

# --- images -------------------------------------------------------------------------------------
images=$STATE/images
mkdir -p "$images"
image_sources=$(sha256sum "$HEADROOM_BIN" "$DNS_BIN/coredns" "$REPO/tests/kube/image/pause.c" \
  "$REPO/tests/kube/image/oci-archive.py" "$(command -v busybox)" | awk '{print $1}' | sha256sum | cut -c1-16)
if [ "$(cat "$images/sources" 2>/dev/null)" != "$image_sources" ]; then
  say "assembling images (headroom from $HEADROOM_BIN)"
  oci=$REPO/tests/kube/image/oci-archive.py
  gcc -O2 -static -o "$images/pause" "$REPO/tests/kube/image/pause.c"
  python3 "$oci" --name localhost/pause:test --out "$images/pause.tar" \
    --file "$images/pause:/pause" --entrypoint /pause >&2
  python3 "$oci" --name localhost/headroom-tools:test --out "$images/tools.tar" \
    --busybox "$(command -v busybox)" >&2
  python3 "$oci" --name localhost/coredns:test --out "$images/coredns.tar" \
    --file "$DNS_BIN/coredns:/coredns" --entrypoint /coredns >&2
  python3 "$oci" --name localhost/headroom:test --out "$images/headroom.tar" \
    --file "$HEADROOM_BIN:/usr/bin/headroom" --libs-of "$HEADROOM_BIN" --entrypoint /usr/bin/headroom >&2
  for archive in pause tools coredns headroom; do
    ctr --address "$RUN/containerd/containerd.sock" -n k8s.io images import "$images/$archive.tar" >/dev/null \
      || die "importing $images/$archive.tar into containerd failed"
  done
  echo "$image_sources" > "$images/sources"
  images_changed=true
else
  images_changed=false
fi

start kubelet "$BIN/kubelet" --config "$STATE/kubelet.yaml" --kubeconfig "$STATE/kubelet.kubeconfig" \
  --node-ip "$NODE_IP" --hostname-override "$NODE_NAME"
start kube-proxy "$BIN/kube-proxy" --config "$STATE/kube-proxy.yaml"
wait_for 120 "node $NODE_NAME to be Ready" \
  $KUBECTL wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s

# --- add-ons and headroom, applied as a user would -----------------------------------------------
$KUBECTL apply -f "$REPO/tests/kube/addons/coredns.yaml" >&2
$KUBECTL apply -k "$REPO/tests/kube/overlay" >&2
if ! $KUBECTL -n headroom get secret headroom-aggregator-token >/dev/null 2>&1; then
  $KUBECTL -n headroom create secret generic headroom-aggregator-token \
    --from-literal=token="$(head -c 32 /dev/urandom | base64)" >&2
fi
if $running && $images_changed; then
  $KUBECTL -n headroom rollout restart daemonset/headroom-agent deployment/headroom-aggregator >&2
fi
$KUBECTL -n kube-system rollout status deployment/coredns --timeout=180s >&2 \
  || die "CoreDNS did not become Ready"
$KUBECTL -n headroom rollout status daemonset/headroom-agent --timeout=180s >&2 \
  || die "the headroom agent DaemonSet did not become Ready ($KUBECTL -n headroom describe pods)"
$KUBECTL -n headroom rollout status deployment/headroom-aggregator --timeout=180s >&2 \
  || die "the headroom aggregator did not become Ready"

say "cluster up: node $NODE_NAME ($NODE_IP), Kubernetes $KUBE_VERSION; logs in $STATE/logs"
echo "export KUBECONFIG=$STATE/admin.kubeconfig"
