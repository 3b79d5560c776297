"""Bad values fail `helm template` and `helm lint` with an error that names what is wrong."""

from __future__ import annotations

import pytest
from deploy_chart import CHART, RELEASE, run_helm

# (--set arguments, text the error must contain)
BAD_VALUES = [
    # values.schema.json
    (["config.backend=rdma"], "/config/backend"),
    (["config.kv_layout=mla"], "/config/kv_layout"),
    (["prefill.config.kv_layout=nchw"], "/prefill/config/kv_layout"),
    (["config.log_level=verbose"], "/config/log_level"),
    (["config.device=gpu"], "/config/device"),
    (["config.vocab_size=100"], "/config/vocab_size"),
    (["config.num_blocks=0"], "/config/num_blocks"),
    (["config.lease_seconds=0"], "/config/lease_seconds"),
    (["config.prefill_policy=round-robin"], "prefill_policy"),
    (["ports.grpc=70000"], "/ports/grpc"),
    (["ports.side=0"], "/ports/side"),
    (["prefill.replicas=-1"], "/prefill/replicas"),
    (["decode.replica=3"], "replica"),
    (["decode.prefillDiscovery=dns"], "/decode/prefillDiscovery"),
    (["decode.prefillPolicy=random"], "/decode/prefillPolicy"),
    (["decode.prefillEndpoints[0]=no-port"], "/decode/prefillEndpoints/0"),
    (["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["image.digest=latest"], "/image/digest"),
    (["auth.insecure=maybe"], "/auth/insecure"),
    (["auth.tls.existingSecret=Bad_Name"], "/auth/tls/existingSecret"),
    (["probes.mode=http"], "/probes/mode"),
    (["service.type=ExternalName"], "/service/type"),
    (["ucx.env.bad-name=1"], "bad-name"),
    (["metrics.serviceMonitor.interval=often"], "/metrics/serviceMonitor/interval"),
    (["decode.pdb.minAvailable=1", "decode.pdb.maxUnavailable=1"], "/decode/pdb"),
    (["unknownTopLevel=1"], "unknownTopLevel"),
    # template checks (fail with a sentence)
    (["ports.side=50051"], "must be distinct"),
    (["ports.http=9400"], "must be distinct"),
    (["decode.config.backend=mooncake"], "both roles must use the same transfer backend"),
    (["prefill.replicas=0"], "there is no prefill daemon"),
    (["terminationGracePeriodSeconds=20"], "must exceed the prefill daemons' drain_timeout"),
    (["decode.config.drain_timeout=90"], "must exceed the decode daemons' drain_timeout"),
    (["probes.mode=grpc"], "native gRPC probe cannot speak TLS"),
    (["auth.tls.create=false"], "there is no certificate"),
    (
        ["metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true"],
        "not both",
    ),
]


def _sets(args: list[str]) -> list[str]:
    return [x for a in args for x in ("--set", a)]


@pytest.mark.parametrize(("sets", "message"), BAD_VALUES, ids=[" ".join(s) for s, _ in BAD_VALUES])
def test_bad_values_are_rejected(sets: list[str], message: str) -> None:
    proc = run_helm("template", RELEASE, str(CHART), *_sets(sets))
    assert proc.returncode != 0, f"accepted: {sets}"
    assert message in proc.stderr, proc.stderr
    assert "panic" not in proc.stderr


def test_lint_rejects_bad_values_too() -> None:
    proc = run_helm("lint", "--strict", str(CHART), *_sets(["config.backend=rdma"]))
    assert proc.returncode != 0
    assert "/config/backend" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "sets",
    [
        ["probes.mode=grpc", "auth.insecure=true"],
        ["decode.replicas=0", "prefill.replicas=0"],
        ["prefill.replicas=0", "decode.prefillEndpoints[0]=10.0.0.1:50051"],
        ["decode.pdb.minAvailable=50%"],
        ["config.device=cuda:3", "gpu.count=4"],
        ["auth.tls.create=false", "auth.tls.existingSecret=my-tls"],
    ],
    ids=lambda s: " ".join(s),
)
def test_good_edge_values_are_accepted(sets: list[str]) -> None:
    """The checks above are not over-eager."""
    proc = run_helm("template", RELEASE, str(CHART), *_sets(sets))
    assert proc.returncode == 0, proc.stderr
