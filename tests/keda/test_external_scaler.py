"""KEDA external scaler conformance, driven by a client that is not headroom's code.

Python stubs are generated at test time with grpcio-tools from the vendored
aggregator/proto/externalscaler.proto (KEDA's published file), then all four
ExternalScaler RPCs are called against a real aggregator process, and
StreamIsActive must push when the workload becomes active and again when it
stops being active.

Needs: pip install grpcio grpcio-tools. The aggregator command defaults to the
crate's `serve` example (built with cargo if missing); set
HEADROOM_AGGREGATOR_CMD (e.g. "target/debug/headroom aggregator") to use another.
"""

import importlib
import json
import os
import queue
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROTO_DIR = os.path.join(ROOT, "aggregator", "proto")
TOKEN = "keda-test-token"
WORKLOAD = "ml/Deployment/llm"


def generate_stubs(out_dir):
    from grpc_tools import protoc

    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(PROTO_DIR, "externalscaler.proto"),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {PROTO_DIR}/externalscaler.proto: rc={rc}")
    sys.path.insert(0, out_dir)
    return (
        importlib.import_module("externalscaler_pb2"),
        importlib.import_module("externalscaler_pb2_grpc"),
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aggregator_cmd():
    cmd = os.environ.get("HEADROOM_AGGREGATOR_CMD")
    if cmd:
        return shlex.split(cmd)
    exe = os.path.join(ROOT, "target", "debug", "examples", "serve")
    subprocess.run(
        ["cargo", "build", "-q", "--locked", "-p", "headroom-aggregator", "--example", "serve"],
        cwd=ROOT,
        check=True,
    )
    return [exe]


def hint(name, p90, capacity=2.0):
    return {
        "workload": {"namespace": "ml", "kind": "Deployment", "name": name},
        "resource": "gpu",
        "replicas": 1,
        "capacity": capacity,
        "usage": capacity / 2,
        "forecast": {"horizon_s": 60.0, "quantiles": [{"q": 0.5, "value": p90 * 0.8}, {"q": 0.9, "value": p90}]},
        "local_headroom": 0.0,
        "desired_capacity": p90,
        "replica_delta": 0.0,
        "confidence": 0.9,
        "reason": "keda test",
    }


class ExternalScalerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import grpc

        cls.grpc = grpc
        cls.tmp = tempfile.mkdtemp(prefix="headroom-keda-")
        cls.pb2, cls.pb2_grpc = generate_stubs(cls.tmp)
        token_file = os.path.join(cls.tmp, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        cls.http_port, cls.grpc_port = free_port(), free_port()
        # A file, not a pipe: a pipe nobody reads would stall the aggregator once full.
        cls.log = open(os.path.join(cls.tmp, "aggregator.log"), "w+b")
        cls.proc = subprocess.Popen(
            aggregator_cmd()
            + [
                "--listen", f"127.0.0.1:{cls.http_port}",
                "--grpc-listen", f"127.0.0.1:{cls.grpc_port}",
                "--token-file", token_file,
            ],
            stderr=cls.log,
        )
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{cls.http_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if cls.proc.poll() is not None or time.time() > deadline:
                cls.log.seek(0)
                err = cls.log.read().decode(errors="replace")
                raise RuntimeError(f"aggregator did not become ready: {err}")
            time.sleep(0.1)
        cls.channel = grpc.insecure_channel(f"127.0.0.1:{cls.grpc_port}")
        cls.stub = cls.pb2_grpc.ExternalScalerStub(cls.channel)
        cls.seq = 0

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.proc.terminate()
        cls.proc.wait(timeout=10)
        cls.log.close()

    def post(self, node, hints):
        type(self).seq += 1
        body = json.dumps(
            {
                "schema": "headroom.hints/v1",
                "node": node,
                "epoch": 1,
                "seq": self.seq,
                "time": time.time(),
                "interval_s": 1.0,
                "hints": hints,
            }
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/v1/hints",
            data=body,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            self.assertEqual(r.status, 200)

    def ref(self, workload=WORKLOAD):
        meta = {"workload": workload} if workload is not None else {}
        return self.pb2.ScaledObjectRef(name="llm", namespace="ml", scalerMetadata=meta)

    def metrics(self, workload=WORKLOAD):
        return self.stub.GetMetrics(
            self.pb2.GetMetricsRequest(scaledObjectRef=self.ref(workload), metricName="s0-headroom-ml-deployment-llm"),
            timeout=5,
        )

    def test_all_rpcs_and_push(self):
        spec = self.stub.GetMetricSpec(self.ref(), timeout=5)
        self.assertEqual(len(spec.metricSpecs), 1)
        self.assertEqual(spec.metricSpecs[0].metricName, "headroom-ml-deployment-llm")
        self.assertEqual(spec.metricSpecs[0].targetSize, 1)
        self.assertEqual(spec.metricSpecs[0].targetSizeFloat, 1.0)

        # No node has reported the workload yet: a clear NOT_FOUND from each call, never a zero
        # that would scale a real workload in.
        for call in (
            lambda: self.stub.IsActive(self.ref(), timeout=5),
            lambda: self.metrics(),
            lambda: next(iter(self.stub.StreamIsActive(self.ref(), timeout=5))),
        ):
            with self.assertRaises(self.grpc.RpcError) as ctx:
                call()
            self.assertEqual(ctx.exception.code(), self.grpc.StatusCode.NOT_FOUND)
            self.assertIn("ml/Deployment/llm", ctx.exception.details())

        # A first node reports no demand for it: known, inactive, zero replicas.
        self.post("node-a", [hint("llm", 0.0)])
        self.assertFalse(self.stub.IsActive(self.ref(), timeout=5).result)
        m = self.metrics()
        self.assertEqual(len(m.metricValues), 1)
        self.assertEqual(m.metricValues[0].metricName, "s0-headroom-ml-deployment-llm")
        self.assertEqual(m.metricValues[0].metricValue, 0)

        pushes = queue.Queue()
        stream = self.stub.StreamIsActive(self.ref())

        def reader():
            try:
                for msg in stream:
                    pushes.put((time.monotonic(), msg.result))
            except self.grpc.RpcError as e:
                if e.code() != self.grpc.StatusCode.CANCELLED:
                    pushes.put((time.monotonic(), e))

        threading.Thread(target=reader, daemon=True).start()
        _, first = pushes.get(timeout=5)
        self.assertIs(first, False, "the stream starts with the current state")

        # Two nodes foresee 3 GPUs each at p90 while holding 2 each: 6 / 2 = 3 replicas.
        t0 = time.monotonic()
        self.post("node-a", [hint("llm", 3.0)])
        self.post("node-b", [hint("llm", 3.0)])
        t_push, became = pushes.get(timeout=5)
        self.assertIs(became, True, "StreamIsActive pushes when the workload becomes active")
        print(f"StreamIsActive push {1000 * (t_push - t0):.1f} ms after the first hint", file=sys.stderr)
        self.assertTrue(self.stub.IsActive(self.ref(), timeout=5).result)
        m = self.metrics()
        self.assertEqual(m.metricValues[0].metricValue, 3)
        self.assertEqual(m.metricValues[0].metricValueFloat, 3.0)

        # Demand rises on one node: 3 + 7 = 10 GPUs at 2 per replica -> 5.
        self.post("node-b", [hint("llm", 7.0)])
        self.assertEqual(self.metrics().metricValues[0].metricValue, 5)

        # Demand gone everywhere: the stream pushes inactive, the metric drops to zero.
        self.post("node-a", [hint("llm", 0.0)])
        self.post("node-b", [hint("llm", 0.0)])
        _, fell = pushes.get(timeout=5)
        self.assertIs(fell, False)
        self.assertFalse(self.stub.IsActive(self.ref(), timeout=5).result)
        self.assertEqual(self.metrics().metricValues[0].metricValue, 0)
        stream.cancel()

        # StreamMetricSpec (optional in the proto) sends the current spec when opened.
        spec_stream = self.stub.StreamMetricSpec(self.ref())
        first_spec = next(iter(spec_stream))
        self.assertEqual(first_spec.metricSpecs[0].metricName, "headroom-ml-deployment-llm")
        spec_stream.cancel()

    def test_missing_workload_metadata_is_invalid_argument(self):
        for call in (
            lambda: self.stub.IsActive(self.ref(None), timeout=5),
            lambda: self.stub.GetMetricSpec(self.ref(None), timeout=5),
            lambda: self.metrics(None),
        ):
            with self.assertRaises(self.grpc.RpcError) as ctx:
                call()
            self.assertEqual(ctx.exception.code(), self.grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("scalerMetadata.workload", ctx.exception.details())


if __name__ == "__main__":
    unittest.main(verbosity=2)
