#!/usr/bin/env python3
"""Validates every Kubernetes manifest under deploy/.

Built-in kinds: `kubernetes-validate --strict` for Kubernetes 1.30.0 and for the newest version
the installed kubernetes-validate knows; a kind it has no schema for is a failure, not a warning.

Custom resources (KEDA ScaledObject, Prometheus Operator ServiceMonitor): checked against
schemas written below from the projects' documented specs (keda.sh "ScaledObject specification"
and "External" scaler pages; prometheus-operator API reference), strictly: an unknown field, a
missing required field or a wrong type fails. With `--crd FILE` (repeatable) they are also
checked against the upstream CustomResourceDefinition's openAPIV3Schema, made strict the way the
API server prunes (unknown fields rejected unless x-kubernetes-preserve-unknown-fields).

With `--agent-bin PATH`, the agent ConfigMap's headroom.toml is run through
`headroom agent --print-config` so a key the agent does not know fails here, not on the node.

Needs: pip install kubernetes-validate (it brings PyYAML and jsonschema).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")

DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"


def obj(props, required=()):
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = obj({"name": STR, "namespace": STR, "labels": STRMAP, "annotations": STRMAP}, ["name"])

# keda.sh/v1alpha1 ScaledObject, as documented at keda.sh/docs/2.x/reference/scaledobject-spec/.
SCALED_OBJECT = obj(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": METADATA,
        "spec": obj(
            {
                "scaleTargetRef": obj(
                    {"apiVersion": STR, "kind": STR, "name": STR, "envSourceContainerName": STR},
                    ["name"],
                ),
                "pollingInterval": INT,
                "cooldownPeriod": INT,
                "initialCooldownPeriod": INT,
                "idleReplicaCount": INT,
                "minReplicaCount": INT,
                "maxReplicaCount": INT,
                "fallback": obj(
                    {"failureThreshold": INT, "replicas": INT, "behavior": STR},
                    ["failureThreshold", "replicas"],
                ),
                "advanced": obj(
                    {
                        "restoreToOriginalReplicaCount": BOOL,
                        "horizontalPodAutoscalerConfig": obj({"name": STR, "behavior": {"type": "object"}}),
                        "scalingModifiers": obj(
                            {"formula": STR, "target": STR, "activationTarget": STR, "metricType": STR}
                        ),
                    }
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": obj(
                        {
                            "type": STR,
                            "name": STR,
                            "metadata": STRMAP,
                            "authenticationRef": obj({"name": STR, "kind": STR}, ["name"]),
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": BOOL,
                        },
                        ["type", "metadata"],
                    ),
                },
            },
            ["scaleTargetRef", "triggers"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

RELABEL = obj(
    {
        "sourceLabels": {"type": "array", "items": STR},
        "separator": STR,
        "targetLabel": STR,
        "regex": STR,
        "modulus": INT,
        "replacement": STR,
        "action": {
            "enum": [
                "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                "dropequal", "DropEqual",
            ]
        },
    }
)
LABEL_SELECTOR = obj(
    {
        "matchLabels": STRMAP,
        "matchExpressions": {
            "type": "array",
            "items": obj(
                {"key": STR, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                 "values": {"type": "array", "items": STR}},
                ["key", "operator"],
            ),
        },
    }
)
# monitoring.coreos.com/v1 ServiceMonitor, as documented in prometheus-operator's API reference.
SERVICE_MONITOR = obj(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": obj(
            {
                "jobLabel": STR,
                "targetLabels": {"type": "array", "items": STR},
                "podTargetLabels": {"type": "array", "items": STR},
                "selector": LABEL_SELECTOR,
                "namespaceSelector": obj({"any": BOOL, "matchNames": {"type": "array", "items": STR}}),
                "sampleLimit": INT,
                "endpoints": {
                    "type": "array",
                    "items": obj(
                        {
                            "port": STR,
                            "targetPort": {"type": ["string", "integer"]},
                            "path": STR,
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "honorLabels": BOOL,
                            "honorTimestamps": BOOL,
                            "relabelings": {"type": "array", "items": RELABEL},
                            "metricRelabelings": {"type": "array", "items": RELABEL},
                        }
                    ),
                },
            },
            ["selector"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
          ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR}


def headroom_rules(doc):
    """What headroom's aggregator needs from a ScaledObject beyond KEDA's own rules."""
    errs = []
    if doc["kind"] != "ScaledObject":
        return errs
    for t in doc["spec"]["triggers"]:
        if t["type"] not in ("external", "external-push"):
            errs.append(f"trigger type {t['type']!r}: headroom is an external scaler")
            continue
        md = t["metadata"]
        if not re.fullmatch(r"[^/\s]+:\d+", md.get("scalerAddress", "")):
            errs.append(f"scalerAddress {md.get('scalerAddress')!r} is not host:port")
        if not re.fullmatch(r"[^/]+/[^/]+/[^/]+", md.get("workload", "")):
            errs.append(f"workload {md.get('workload')!r} is not namespace/Kind/name")
    return errs


def strict_crd_schema(s):
    if isinstance(s, dict):
        if (s.get("type") == "object" and "properties" in s
                and not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s):
            s["additionalProperties"] = False
        for v in s.values():
            strict_crd_schema(v)
    elif isinstance(s, list):
        for v in s:
            strict_crd_schema(v)
    return s


def crd_schemas(paths):
    out = {}
    for p in paths:
        with open(p) as f:
            crd = yaml.safe_load(f)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = strict_crd_schema(v["schema"]["openAPIV3Schema"])
            # The API server validates metadata itself, not through the CRD.
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            out[(f"{group}/{v['name']}", kind)] = (schema, p)
    return out


def manifest_files():
    """Every manifest under deploy/ (optional/ too); kustomization.yaml is kustomize's, not an object."""
    out = []
    for d, _, names in os.walk(DEPLOY):
        out += [os.path.join(d, f) for f in names
                if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml"]
    return sorted(out)


def newest_version():
    return kubernetes_validate.latest_version()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crd", action="append", default=[], help="upstream CRD file to check CRs against")
    ap.add_argument("--agent-bin", help="headroom binary, to check the agent ConfigMap's config")
    args = ap.parse_args()

    files = manifest_files()
    if not files:
        sys.exit(f"no manifests in {DEPLOY}")
    upstream = crd_schemas(args.crd)
    failures = []
    checked = 0
    for version in ("1.30.0", newest_version()):
        for path in files:
            with open(path) as f:
                docs = [d for d in yaml.safe_load_all(f) if d]
            for doc in docs:
                what = f"{os.path.relpath(path, ROOT)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
                key = (doc.get("apiVersion"), doc.get("kind"))
                if key in CUSTOM:
                    if version != "1.30.0":
                        continue  # custom resources do not depend on the Kubernetes version
                    errs = [f"{list(e.path)}: {e.message}" for e in
                            jsonschema.Draft7Validator(CUSTOM[key]).iter_errors(doc)]
                    errs += headroom_rules(doc) if not errs else []
                    if key in upstream:
                        schema, crd = upstream[key]
                        errs += [f"upstream CRD {crd}: {list(e.path)}: {e.message}" for e in
                                 jsonschema.Draft7Validator(schema).iter_errors(doc)]
                    source = "documented spec" + (" and upstream CRD" if key in upstream else "")
                else:
                    try:
                        kubernetes_validate.validate(doc, version, strict=True)
                        errs = []
                    except kubernetes_validate.ValidationError as e:
                        # The first line names the field; the rest dumps the whole schema.
                        errs = [str(e).splitlines()[0][:400]]
                    except (kubernetes_validate.SchemaNotFoundError,
                            kubernetes_validate.InvalidSchemaError) as e:
                        errs = [f"no schema: {e}"]
                    source = f"Kubernetes {version} --strict"
                checked += 1
                if errs:
                    failures += [f"FAIL {what} ({source}): {e}" for e in errs]
                else:
                    print(f"ok   {what} ({source})")

    if args.agent_bin:
        for path in files:
            with open(path) as f:
                for doc in yaml.safe_load_all(f):
                    if doc and doc.get("kind") == "ConfigMap" and "headroom.toml" in doc.get("data", {}):
                        with tempfile.NamedTemporaryFile("w", suffix=".toml") as t:
                            t.write(doc["data"]["headroom.toml"])
                            t.flush()
                            r = subprocess.run([args.agent_bin, "agent", "--print-config", "--config", t.name],
                                               capture_output=True, text=True)
                        name = f"{os.path.relpath(path, ROOT)}: ConfigMap/{doc['metadata']['name']} headroom.toml"
                        if r.returncode != 0:
                            failures.append(f"FAIL {name}: {r.stderr.strip()}")
                        else:
                            print(f"ok   {name} (accepted by the agent)")

    for f in failures:
        print(f)
    print(f"{checked} checks, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
