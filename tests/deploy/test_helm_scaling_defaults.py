"""Chart defaults for multi-node pools: discovery of ready prefill pods, spreading, probes
that separate liveness from readiness, cert-manager certificates, the auth checksum."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from deploy_chart import CHART, RELEASE, container, fullname, render, role_labels, run_helm
from kvbridge.connector.serving.daemon.config import DaemonConfig
from kvbridge.connector.serving.daemon.health import LIVENESS_SERVICE
from kvbridge.connector.serving.daemon.targets import parse_target

ROLES = ("prefill", "decode")
CERT_MANAGER = (
    "auth.tls.certManager.enabled=true",
    "auth.tls.certManager.issuerRef.name=inference-ca",
    "auth.tls.certManager.issuerRef.kind=ClusterIssuer",
)
SCHEMA = Path(__file__).parent / "schemas" / "cert-manager.io-v1.json"


def _sts(r, role: str) -> dict:
    return r.get("StatefulSet", f"{fullname()}-{role}")


def _pod(r, role: str) -> dict:
    return _sts(r, role)["spec"]["template"]


def test_side_port_default_is_not_vllms():
    r = render("default")
    assert r.values["ports"]["side"] == DaemonConfig(role="prefill").side_port == 5610
    for role in ROLES:
        ports = {p["name"]: p["containerPort"] for p in container(_sts(r, role))["ports"]}
        assert ports["side"] == 5610


SERVICE_NO_SPREAD = (
    "decode.prefillDiscovery=service",
    "podAntiAffinity=none",
    "topologySpread.enabled=false",
)


def test_discovery_service_lists_ready_pods_and_service_mode_dials_every_one():
    r = render("default", SERVICE_NO_SPREAD)
    svc = r.get("Service", f"{fullname()}-prefill-headless")["spec"]
    assert svc["publishNotReadyAddresses"] is False and svc["clusterIP"] == "None"
    args = container(_sts(r, "decode"))["args"]
    (target,) = [a.split("=", 1)[1] for a in args if a.startswith("--prefill=")]
    t = parse_target(target)  # the daemon's own parser: a name re-resolved to every address
    assert target.startswith("dns:///") and t.dynamic
    assert t.name == f"{fullname()}-prefill-headless.inference.svc.cluster.local"


@pytest.mark.parametrize("value_set", ["default", "cpu-insecure"])
def test_liveness_and_startup_do_not_depend_on_readiness(value_set):
    c = container(_sts(render(value_set), "decode"))
    for kind, service in (
        ("startup", LIVENESS_SERVICE),
        ("liveness", LIVENESS_SERVICE),
        ("readiness", ""),
    ):
        probe = c[f"{kind}Probe"]
        got = (
            probe["grpc"]["service"]
            if "grpc" in probe
            else next(
                a.split("=", 1)[1] for a in probe["exec"]["command"] if a.startswith("--service=")
            )
        )
        assert got == service, (kind, probe)


def test_soft_anti_affinity_and_spread_by_default_hard_or_none_on_request():
    for role in ROLES:
        spec = _pod(render("default"), role)["spec"]
        pref = spec["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        assert pref[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == role_labels(role)
        (spread,) = spec["topologySpreadConstraints"]
        assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
        assert spread["labelSelector"]["matchLabels"] == role_labels(role)
    r = render("default", ("podAntiAffinity=hard", "prefill.affinity.nodeAffinity.x=1"))
    hard = _pod(r, "decode")["spec"]["affinity"]
    assert list(hard["podAntiAffinity"]) == ["requiredDuringSchedulingIgnoredDuringExecution"]
    assert _pod(r, "prefill")["spec"]["affinity"] == {"nodeAffinity": {"x": 1}}  # its own wins
    off = _pod(render("default", SERVICE_NO_SPREAD), "prefill")
    assert "affinity" not in off["spec"] and "topologySpreadConstraints" not in off["spec"]


def test_cert_manager_certificate_replaces_the_generated_secret():
    r = render("default", CERT_MANAGER)
    cert = r.get("Certificate", f"{fullname()}-tls")
    jsonschema.validate(cert, json.loads(SCHEMA.read_text()))
    assert cert["spec"]["secretName"] == f"{fullname()}-tls"
    assert cert["spec"]["issuerRef"] == {
        "name": "inference-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"
    }  # fmt: skip
    assert {"server auth", "client auth"} <= set(cert["spec"]["usages"])
    assert r.find("Secret", f"{fullname()}-tls") is None  # cert-manager writes it
    # the names the generated certificate covers, the same list
    ours = render("default").get("Secret", f"{fullname()}-tls")
    assert ours is not None
    names = set(cert["spec"]["dnsNames"])
    headless = f"{fullname()}-prefill-headless.inference.svc.cluster.local"
    assert {"localhost", f"*.{headless}", headless} <= names
    assert {"127.0.0.1", "::1"} == set(cert["spec"]["ipAddresses"])
    # the pods mount the Secret it writes
    vols = {v["name"]: v for v in _pod(r, "decode")["spec"]["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == f"{fullname()}-tls"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("auth.tls.certManager.enabled=true",), "certManager.issuerRef.name"),
        ((*CERT_MANAGER, "auth.tls.existingSecret=x"), "cannot be combined with existingSecret"),
    ],
)
def test_cert_manager_misuse_is_refused(sets, message):
    proc = run_helm("template", RELEASE, str(CHART), *[x for s in sets for x in ("--set", s)])
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def _checksum(r, role: str) -> str:
    return _pod(r, role)["metadata"]["annotations"]["checksum/auth"]


def test_auth_checksum_rolls_pods_when_credentials_change():
    r = render("default")
    assert _checksum(r, "prefill") == _checksum(r, "decode")  # one set of credentials
    # existing Secrets: deterministic, and a different Secret name rolls the pods
    a = render("existing-secrets")
    b = render("existing-secrets", ("auth.token.existingSecret=other-token",))
    assert _checksum(a, "decode") != _checksum(b, "decode")
    again = run_helm("template", RELEASE, str(CHART), "-n", "inference", "-f",
                     str(CHART / "ci" / "existing-secrets-values.yaml"))  # fmt: skip
    assert _checksum(a, "decode") in again.stdout
    # cert-manager: the Certificate's spec is in it, its renewals are not (reloaded live)
    c1 = render("default", CERT_MANAGER)
    c2 = render("default", (*CERT_MANAGER, "auth.tls.certManager.duration=720h"))
    assert _checksum(c1, "decode") != _checksum(c2, "decode")
    assert "checksum/auth" not in _pod(render("cpu-insecure"), "decode")["metadata"]["annotations"]
