"""A Kubernetes device plugin for the test cluster: registers `nvidia.com/gpu` devices with the
real kubelet, whose ids are the fake NVML's GPU UUIDs (a time-sliced replica is `UUID::N`, as the
NVIDIA device plugin names them), and logs each Allocate the kubelet makes, so a test knows which
device a container got without asking headroom.

    python3 fake_gpu_plugin.py --log allocations.jsonl GPU-aaa GPU-bbb::0 GPU-bbb::1

Runs on the node as root, beside the kubelet (its socket folder is
/var/lib/kubelet/device-plugins). Stubs are generated at start with grpcio-tools from the
vendored deviceplugin_v1beta1.proto. Re-registers when the kubelet restarts (its socket is
recreated, which removes ours). Stops on SIGTERM.
"""

import argparse
import importlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
RESOURCE = "nvidia.com/gpu"


def stubs(out_dir):
    from grpc_tools import protoc

    proto = "deviceplugin_v1beta1.proto"
    rc = protoc.main(
        ["protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", os.path.join(HERE, proto)]
    )
    if rc != 0:
        raise SystemExit(f"grpc_tools.protoc failed on {HERE}/{proto}: rc={rc}")
    sys.path.insert(0, out_dir)
    return (
        importlib.import_module("deviceplugin_v1beta1_pb2"),
        importlib.import_module("deviceplugin_v1beta1_pb2_grpc"),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", required=True, help="JSON lines file: one line per Allocate")
    ap.add_argument("--plugin-dir", default=PLUGIN_DIR)
    ap.add_argument("--resource", default=RESOURCE)
    ap.add_argument("devices", nargs="+", help="device ids to advertise")
    args = ap.parse_args()

    import grpc

    pb, pb_grpc = stubs(tempfile.mkdtemp(prefix="fake-gpu-plugin-"))
    stop = threading.Event()
    log_lock = threading.Lock()

    class Plugin(pb_grpc.DevicePluginServicer):
        def GetDevicePluginOptions(self, request, context):
            return pb.DevicePluginOptions()

        def ListAndWatch(self, request, context):
            yield pb.ListAndWatchResponse(devices=[pb.Device(ID=d, health="Healthy") for d in args.devices])
            while not stop.is_set() and context.is_active():
                time.sleep(0.2)

        def GetPreferredAllocation(self, request, context):
            return pb.PreferredAllocationResponse()

        def Allocate(self, request, context):
            responses = []
            for c in request.container_requests:
                ids = list(c.devices_ids)
                with log_lock, open(args.log, "a") as f:
                    f.write(json.dumps({"at": time.time(), "devices": ids}) + "\n")
                visible = ",".join(sorted({i.split("::")[0] for i in ids}))
                responses.append(pb.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": visible}))
            return pb.AllocateResponse(container_responses=responses)

        def PreStartContainer(self, request, context):
            return pb.PreStartContainerResponse()

    endpoint = f"headroom-fake-gpu-{os.getpid()}.sock"
    path = os.path.join(args.plugin_dir, endpoint)
    kubelet_sock = os.path.join(args.plugin_dir, "kubelet.sock")

    def serve():
        if os.path.exists(path):
            os.unlink(path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_DevicePluginServicer_to_server(Plugin(), server)
        server.add_insecure_port(f"unix://{path}")
        server.start()
        with grpc.insecure_channel(f"unix://{kubelet_sock}") as ch:
            pb_grpc.RegistrationStub(ch).Register(
                pb.RegisterRequest(version="v1beta1", endpoint=endpoint, resource_name=args.resource), timeout=10
            )
        print(f"registered {args.resource} {args.devices} at {path}", flush=True)
        return server

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = None
    while not stop.is_set():
        # The kubelet deletes every socket in its folder when it starts: serve and register again.
        if server is None or not os.path.exists(path):
            if server is not None:
                server.stop(0)
                server = None
            try:
                if os.path.exists(kubelet_sock):
                    server = serve()
            except grpc.RpcError as e:
                print(f"register with {kubelet_sock}: {e}", file=sys.stderr, flush=True)
                server = None
        stop.wait(1.0)
    if server is not None:
        server.stop(0)
    if os.path.exists(path):
        os.unlink(path)


if __name__ == "__main__":
    main()
