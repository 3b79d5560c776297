"""Authentication on by default: the generated CA, certificate, token and side secret."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import ExtendedKeyUsageOID
from deploy_chart import NAMESPACE, arg_values, container, fullname, render


def _secret(value_set: str, name: str, sets: tuple[str, ...] = ()) -> dict[str, bytes]:
    s = render(value_set, sets).get("Secret", name)
    return {k: base64.b64decode(v) for k, v in s["data"].items()}


def _hostname_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def test_default_is_authenticated() -> None:
    r = render("default")
    assert r.values["auth"]["insecure"] is False
    for role in ("prefill", "decode"):
        args = container(r.get("StatefulSet", f"{fullname()}-{role}"))["args"]
        assert "--insecure" not in args
        for flag in (
            "--tls-cert",
            "--tls-key",
            "--tls-ca",
            "--auth-token-file",
            "--side-secret-file",
        ):
            assert len(arg_values(args, flag)) == 1, flag
    tls = r.get("Secret", f"{fullname()}-tls")
    assert tls["type"] == "kubernetes.io/tls"
    assert set(tls["data"]) == {"tls.crt", "tls.key", "ca.crt"}


@pytest.mark.parametrize("value_set", ["default", "rdma-mooncake"])
def test_generated_certificate_covers_every_dialled_name(value_set: str) -> None:
    r = render(value_set)
    data = _secret(value_set, f"{fullname()}-tls")
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    key = serialization.load_pem_private_key(data["tls.key"], password=None)
    # the key is the certificate's, and the CA signed it
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    ca.public_key().verify(
        cert.signature,
        cert.tbs_certificate_bytes,
        padding.PKCS1v15(),
        cert.signature_hash_algorithm,
    )
    assert cert.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    # one certificate serves and dials (decode -> prefill gRPC): both usages
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in ips
    domain = f"{NAMESPACE}.svc.{r.values['clusterDomain']}"
    decode_args = container(r.get("StatefulSet", f"{fullname()}-decode"))["args"]
    names = [t.rsplit(":", 1)[0] for t in arg_values(decode_args, "--prefill")]
    names += [fullname(), f"{fullname()}.{domain}", r.values["probes"]["tlsServerName"]]
    names += [f"{fullname()}-decode-0.{fullname()}-decode-headless.{domain}"]
    names += r.values["auth"]["tls"]["extraDnsNames"]
    for name in names:
        assert any(_hostname_matches(p, name) for p in dns), f"{name} not in {dns}"
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == r.values["auth"]["tls"]["validityDays"]


def test_generated_token_and_side_secret() -> None:
    data = _secret("default", f"{fullname()}-auth")
    token, side = data["token"], data["side-secret"]
    assert len(token) >= 32 and len(side) >= 48
    assert token.isalnum() and side.isalnum() and token != side
    again = _secret("default", f"{fullname()}-auth", ("config.seed=1",))
    assert again["token"] != token  # random per render (lookup keeps them on a real upgrade)


def test_existing_secrets_are_not_generated() -> None:
    r = render("existing-secrets")
    assert not r.of_kind("Secret")
    sts = r.get("StatefulSet", f"{fullname()}-prefill")
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "kvbridge-tls-from-cert-manager"
    sources = [s["secret"] for s in vols["auth"]["projected"]["sources"]]
    assert sources == [
        {"name": "kvbridge-api-token", "items": [{"key": "api-token", "path": "token"}]},
        {"name": "kvbridge-side", "items": [{"key": "hmac", "path": "side-secret"}]},
    ]


def test_partially_existing_auth_generates_the_rest() -> None:
    data = _secret("default", f"{fullname()}-auth", ("auth.token.existingSecret=mine",))
    assert set(data) == {"side-secret"}
