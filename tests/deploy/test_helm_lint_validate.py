"""Real `helm lint --strict` and `helm template`; every manifest through kubernetes-validate.

Kubernetes versions: 1.27 (the chart's kubeVersion floor: native gRPC probes are GA
there) and the newest kubernetes-validate knows. ServiceMonitor/PodMonitor are CRDs
(kubernetes-validate has no schema for them): they are validated against
tests/deploy/schemas/monitoring.coreos.com-v1.json, a strict subset of the Prometheus
Operator v1 API; cert-manager's Certificate against cert-manager.io-v1.json likewise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_chart import CHART, NAMESPACE, RELEASE, VALUE_SETS, render, run_helm, values_args
from engines import BACKENDS

MIN_KUBE = "1.27.0"
KUBE_VERSIONS = (MIN_KUBE, kubernetes_validate.latest_version())
CRD_GROUPS = {
    "monitoring.coreos.com/v1": "monitoring.coreos.com-v1.json",
    "cert-manager.io/v1": "cert-manager.io-v1.json",
}
SCHEMAS = Path(__file__).parent / "schemas"


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
@pytest.mark.parametrize("kube", ["", MIN_KUBE])
def test_helm_lint_strict(value_set: str, kube: str) -> None:
    extra = ["--kube-version", kube] if kube else []
    proc = run_helm("lint", "--strict", str(CHART), *extra, *values_args(value_set))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_value_sets_cover_the_issue() -> None:
    """The rendered sets exercise both backends, both auth modes, hostNetwork, RDMA, monitors."""
    vals = {name: render(name).values for name in VALUE_SETS}
    assert len(vals) >= 4
    backends = {v["config"]["backend"] for v in vals.values()}
    assert backends == set(BACKENDS)
    assert {v["auth"]["insecure"] for v in vals.values()} == {True, False}
    assert any(v["hostNetwork"] for v in vals.values())
    assert any(v["rdma"]["enabled"] for v in vals.values())
    assert any(v["metrics"]["serviceMonitor"]["enabled"] for v in vals.values())
    assert any(v["metrics"]["podMonitor"]["enabled"] for v in vals.values())
    assert {v["decode"]["prefillDiscovery"] for v in vals.values()} == {"pods", "service"}
    assert any(v["auth"]["tls"]["existingSecret"] for v in vals.values())


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_every_manifest_validates_strict(value_set: str) -> None:
    rendered = render(value_set)
    crd_schema = {api: json.loads((SCHEMAS / name).read_text()) for api, name in CRD_GROUPS.items()}
    kinds = set()
    for doc in rendered.docs:
        kinds.add(doc["kind"])
        assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]
        if doc["apiVersion"] in crd_schema:
            jsonschema.validate(doc, crd_schema[doc["apiVersion"]])
            continue
        for version in KUBE_VERSIONS:
            # raises ValidationError naming the field; SchemaNotFoundError for unknown kinds
            kubernetes_validate.validate(doc, version, strict=True)
    assert {"StatefulSet", "Service", "ConfigMap"} <= kinds


def test_crd_schema_rejects_a_typo() -> None:
    """The hand-written CRD schema is strict: a misspelt field fails."""
    schema = json.loads((SCHEMAS / "monitoring.coreos.com-v1.json").read_text())
    sm = render("rdma-mooncake").of_kind("ServiceMonitor")[0]
    bad = json.loads(json.dumps(sm))
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_kubernetes_validate_cli_on_default_render(tmp_path: Path) -> None:
    """The kubernetes-validate command (--strict) on the default render, as a user runs it."""
    proc = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE)
    assert proc.returncode == 0, proc.stderr
    manifest = tmp_path / "default.yaml"
    manifest.write_text(proc.stdout)
    for version in KUBE_VERSIONS:
        cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", version]
        res = subprocess.run(
            [*cmd, str(manifest)], capture_output=True, text=True, timeout=60, check=False
        )
        assert res.returncode == 0, res.stdout + res.stderr
    # and it does fail on a broken manifest (the check can fail)
    broken = tmp_path / "broken.yaml"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for d in docs:
        if d["kind"] == "StatefulSet":
            d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpcc"] = {}
    broken.write_text(yaml.safe_dump_all(docs))
    res = subprocess.run(
        [*cmd, str(broken)], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode != 0 and "grpcc" in res.stdout + res.stderr
