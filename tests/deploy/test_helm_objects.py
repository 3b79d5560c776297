"""Assertions on the rendered objects: replicas, discovery, ports, env, probes, PDBs, monitors."""

from __future__ import annotations

import hashlib

import pytest
from deploy_chart import (
    NAMESPACE,
    VALUE_SETS,
    Rendered,
    arg_values,
    container,
    fullname,
    render,
    role_labels,
)

ROLES = ("prefill", "decode")
SETS = list(VALUE_SETS)


def _sts(r: Rendered, role: str) -> dict:
    return r.get("StatefulSet", f"{fullname()}-{role}")


def _headless(role: str) -> str:
    return f"{fullname()}-{role}-headless"


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("value_set", SETS)
def test_replicas_and_stable_names(value_set: str) -> None:
    r = render(value_set)
    for role in ROLES:
        sts = _sts(r, role)
        assert sts["spec"]["replicas"] == r.values[role]["replicas"]
        assert sts["spec"]["serviceName"] == _headless(role)
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        assert sts["spec"]["selector"]["matchLabels"] == role_labels(role)
        assert _matches(role_labels(role), pod_labels)
        svc = r.get("Service", _headless(role))
        assert svc["spec"]["clusterIP"] == "None"
        # prefill's is the discovery Service: ready pods only
        assert svc["spec"]["publishNotReadyAddresses"] is (role == "decode")
        assert svc["spec"]["selector"] == role_labels(role)
        assert container(sts)["name"] == role


@pytest.mark.parametrize("value_set", SETS)
def test_decode_finds_every_prefill_pod(value_set: str) -> None:
    """--prefill names resolve through the prefill headless Service to real pods."""
    r = render(value_set)
    v = r.values
    args = container(_sts(r, "decode"))["args"]
    targets = arg_values(args, "--prefill")
    port = v["ports"]["grpc"]
    domain = f"{NAMESPACE}.svc.{v['clusterDomain']}"
    n = v["prefill"]["replicas"]
    if v["decode"]["prefillDiscovery"] == "pods":
        ours = [
            f"{fullname()}-prefill-{i}.{_headless('prefill')}.{domain}:{port}" for i in range(n)
        ]
    else:
        ours = [f"dns:///{_headless('prefill')}.{domain}:{port}"] if n else []
    assert targets == ours + list(v["decode"]["prefillEndpoints"])
    assert targets, "decode needs at least one prefill daemon"
    assert not arg_values(container(_sts(r, "prefill"))["args"], "--prefill")
    if ours:  # the port they dial is the prefill gRPC port the headless Service publishes
        svc_ports = {
            p["name"]: p["port"] for p in r.get("Service", _headless("prefill"))["spec"]["ports"]
        }
        assert svc_ports["grpc"] == port


@pytest.mark.parametrize("value_set", SETS)
def test_ports_agree_everywhere(value_set: str) -> None:
    r = render(value_set)
    ports = r.values["ports"]
    assert len(set(ports.values())) == 4
    for role in ROLES:
        c = container(_sts(r, role))
        declared = {p["name"]: p["containerPort"] for p in c["ports"]}
        # the OpenAI-compatible HTTP API is the decode daemons' only
        assert declared == {k: v for k, v in ports.items() if role == "decode" or k != "http"}
        assert arg_values(c["args"], "--http-port") == (
            [str(ports["http"])] if role == "decode" else []
        )
        assert all(p["protocol"] == "TCP" for p in c["ports"])
        for name, flag in (
            ("grpc", "--grpc-port"),
            ("side", "--side-port"),
            ("metrics", "--metrics-port"),
        ):
            assert arg_values(c["args"], flag) == [str(ports[name])]
        assert arg_values(c["args"], "--host") == [r.values["bindHost"]]
        svc = r.get("Service", _headless(role))
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in declared and p["port"] == declared[p["targetPort"]]
        assert {p["name"] for p in svc["spec"]["ports"]} == set(declared)
    api = r.get("Service", fullname())
    assert api["spec"]["selector"] == role_labels("decode")
    assert api["spec"]["type"] == r.values["service"]["type"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in api["spec"]["ports"]] == [
        ("grpc", ports["grpc"], "grpc"),
        ("http", ports["http"], "http"),
    ]


@pytest.mark.parametrize("value_set", SETS)
def test_env_transport_and_advertise_host(value_set: str) -> None:
    r = render(value_set)
    for role in ROLES:
        env = {e["name"]: e for e in container(_sts(r, role))["env"]}
        assert (
            env["KVBRIDGE_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        )
        assert env["HOME"]["value"] == "/tmp" and env["TRITON_CACHE_DIR"]["value"].startswith(
            "/tmp/"
        )
        backend = r.role_config(role)["backend"]
        used, unused = ("mooncake", "ucx") if backend == "mooncake" else ("ucx", "mooncake")
        for name, value in r.values[used]["env"].items():
            assert env[name]["value"] == str(value)
        for name in r.values[unused]["env"]:
            assert name not in env, f"{unused} env {name} rendered for backend {backend}"
        for extra in r.values["env"] + r.values[role]["extraEnv"]:
            assert env[extra["name"]] == extra


@pytest.mark.parametrize("value_set", SETS)
def test_probes_use_grpc_health(value_set: str) -> None:
    """Native gRPC probe when plaintext; exec of kvbridge-healthcheck over TLS otherwise."""
    r = render(value_set)
    v = r.values
    for role in ROLES:
        c = container(_sts(r, role))
        for kind in ("startup", "readiness", "liveness"):
            probe = c[f"{kind}Probe"]
            for key, want in v["probes"][kind].items():
                assert probe[key] == want
            mode = v["probes"]["mode"]
            if mode == "auto":
                mode = "grpc" if v["auth"]["insecure"] else "exec"
            # readiness: takes work; startup and liveness: serves gRPC (also while draining)
            service = v["probes"]["service" if kind == "readiness" else "livenessService"]
            if mode == "grpc":
                assert probe["grpc"] == {"port": v["ports"]["grpc"], "service": service}
                assert "exec" not in probe
            else:
                cmd = probe["exec"]["command"]
                assert cmd[0] == "kvbridge-healthcheck"
                assert arg_values(cmd, "--target") == [f"127.0.0.1:{v['ports']['grpc']}"]
                assert arg_values(cmd, "--service") == [service]
                if not v["auth"]["insecure"]:
                    assert arg_values(cmd, "--tls-server-name") == [v["probes"]["tlsServerName"]]
                    for flag in ("--tls-ca", "--tls-cert", "--tls-key", "--auth-token-file"):
                        assert arg_values(cmd, flag) == arg_values(c["args"], flag)


def _default_affinity(role: str) -> dict:
    """Soft anti-affinity: pods of a role prefer distinct nodes."""
    term = {
        "topologyKey": "kubernetes.io/hostname",
        "labelSelector": {"matchLabels": role_labels(role)},
    }
    return {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": term}]}}  # fmt: skip


def _default_spread(role: str) -> list:
    return [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
             "whenUnsatisfiable": "ScheduleAnyway",
             "labelSelector": {"matchLabels": role_labels(role)}}]  # fmt: skip


@pytest.mark.parametrize("value_set", SETS)
def test_resources_gpu_rdma_and_security(value_set: str) -> None:
    r = render(value_set)
    v = r.values
    for role in ROLES:
        sts = _sts(r, role)
        pod = sts["spec"]["template"]["spec"]
        c = container(sts)
        res = c["resources"]
        for kind in ("requests", "limits"):
            for name, amount in (v[role]["resources"].get(kind) or {}).items():
                assert res[kind][name] == amount
            for dev in ("gpu", "rdma"):
                if v[dev]["enabled"]:
                    assert res[kind][v[dev]["resourceName"]] == v[dev]["count"]
                else:
                    assert v[dev]["resourceName"] not in res.get(kind, {})
        caps = c["securityContext"].get("capabilities", {})
        assert caps["drop"] == ["ALL"]
        assert ("IPC_LOCK" in caps.get("add", [])) == v["rdma"]["enabled"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vols = {vol["name"]: vol for vol in pod["volumes"]}
        assert vols[mounts["/tmp"]]["emptyDir"] == {}
        assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert pod.get("hostNetwork", False) == v["hostNetwork"]
        if v["hostNetwork"]:
            assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        annotations = sts["spec"]["template"]["metadata"]["annotations"]
        if v["rdma"]["enabled"] and v["rdma"]["networks"]:
            assert annotations["k8s.v1.cni.cncf.io/networks"] == ",".join(v["rdma"]["networks"])
        else:
            assert "k8s.v1.cni.cncf.io/networks" not in annotations
        assert pod.get("nodeSelector", {}) == (v[role]["nodeSelector"] or v["nodeSelector"])
        assert pod.get("tolerations", []) == (v[role]["tolerations"] or v["tolerations"])
        assert pod["affinity"] == (v[role]["affinity"] or v["affinity"] or _default_affinity(role))
        assert pod["topologySpreadConstraints"] == (
            v[role]["topologySpreadConstraints"] or _default_spread(role)
        )
        assert pod.get("imagePullSecrets", []) == v["imagePullSecrets"]
        image = v["image"]
        want = (
            f"{image['repository']}@{image['digest']}"
            if image["digest"]
            else f"{image['repository']}:{image['tag'] or '0.1.0'}"
        )
        assert c["image"] == want and c["imagePullPolicy"] == image["pullPolicy"]
        assert c["command"] == ["kvbridge"] and c["args"][0] == role


@pytest.mark.parametrize("value_set", SETS)
def test_config_checksum_rolls_pods(value_set: str) -> None:
    """The pod template carries the sha256 of its role's config file: a change rolls the pods."""
    r = render(value_set)
    cm = r.get("ConfigMap", f"{fullname()}-config")
    for role in ROLES:
        text = cm["data"][f"{role}.yaml"]
        digest = hashlib.sha256(text.rstrip("\n").encode()).hexdigest()
        annotations = _sts(r, role)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["checksum/config"] == digest


def test_config_change_changes_checksum() -> None:
    a = _sts(render("default"), "decode")["spec"]["template"]["metadata"]["annotations"]
    b = _sts(render("default", ("config.lease_seconds=45",)), "decode")
    assert (
        a["checksum/config"] != b["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    )


@pytest.mark.parametrize("value_set", SETS)
def test_pod_disruption_budgets(value_set: str) -> None:
    r = render(value_set)
    for role in ROLES:
        pdb_values = r.values[role]["pdb"]
        pdb = r.find("PodDisruptionBudget", f"{fullname()}-{role}")
        if not pdb_values["enabled"] or r.values[role]["replicas"] == 0:
            assert pdb is None
            continue
        assert pdb is not None
        assert pdb["spec"]["selector"]["matchLabels"] == role_labels(role)
        if "minAvailable" in pdb_values:
            assert pdb["spec"]["minAvailable"] == pdb_values["minAvailable"]
            assert "maxUnavailable" not in pdb["spec"]
        else:
            assert pdb["spec"]["maxUnavailable"] == pdb_values.get("maxUnavailable", 1)


@pytest.mark.parametrize("value_set", SETS)
def test_metrics_monitors_select_the_metrics_port(value_set: str) -> None:
    r = render(value_set)
    m = r.values["metrics"]
    sms, pms = r.of_kind("ServiceMonitor"), r.of_kind("PodMonitor")
    assert len(sms) == int(m["serviceMonitor"]["enabled"])
    assert len(pms) == int(m["podMonitor"]["enabled"])
    for sm in sms:
        assert sm["metadata"]["labels"] | m["serviceMonitor"]["labels"] == sm["metadata"]["labels"]
        selected = [
            s
            for s in r.of_kind("Service")
            if _matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert {s["metadata"]["name"] for s in selected} == {_headless(x) for x in ROLES}
        for s in selected:
            assert "metrics" in {p["name"] for p in s["spec"]["ports"]}
        assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
        assert sm["spec"]["endpoints"][0]["interval"] == m["serviceMonitor"]["interval"]
    for pm in pms:
        for role in ROLES:
            sts = _sts(r, role)
            assert _matches(
                pm["spec"]["selector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"]
            )
        assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]


@pytest.mark.parametrize("value_set", SETS)
def test_network_policy_names_real_ports(value_set: str) -> None:
    r = render(value_set)
    nps = r.of_kind("NetworkPolicy")
    v = r.values
    assert len(nps) == int(v["networkPolicy"]["enabled"] and not v["hostNetwork"])
    for np in nps:
        rules = np["spec"]["ingress"]
        # the release's pods reach every port (side channel; UCX/Mooncake pick engine ports)
        assert "ports" not in rules[0]
        assert rules[0]["from"][0]["podSelector"]["matchLabels"] == {
            k: role_labels("decode")[k]
            for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")
        }
        named = {p["port"] for rule in rules[1:] for p in rule["ports"]}
        assert named <= {"grpc", "http", "metrics"}
        assert rules[1]["from"] == v["networkPolicy"]["grpcFrom"]
