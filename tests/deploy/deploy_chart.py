"""Helpers of the chart tests: real helm (from .tools/), rendering, merged values, lookups."""

from __future__ import annotations

import atexit
import copy
import functools
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "kvbridge"
CI_DIR = CHART / "ci"
RELEASE = "kvb"
NAMESPACE = "inference"
HELM_TIMEOUT_S = 60

# "default" renders values.yaml alone; the others add deploy/helm/kvbridge/ci/<name>-values.yaml.
VALUE_SETS: dict[str, Path | None] = {"default": None} | {
    p.name.removesuffix("-values.yaml"): p for p in sorted(CI_DIR.glob("*-values.yaml"))
}


def load_module(path: Path, name: str) -> ModuleType:
    """Import a file that is not in a package (deploy/*.py)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def helm_binary() -> Path:
    """The verified helm of deploy/fetch_helm.py (fetched into .tools/ on first use)."""
    fetch = load_module(DEPLOY / "fetch_helm.py", "kvbridge_fetch_helm")
    return fetch.ensure_helm()


@functools.cache
def _helm_home() -> str:
    home = tempfile.mkdtemp(prefix="kvbridge-helm-home-")
    atexit.register(shutil.rmtree, home, True)
    return home


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm with its config/cache/data dirs in a private temp dir (no ~/.cache writes)."""
    home = _helm_home()
    env = dict(os.environ)
    for var in ("HELM_CONFIG_HOME", "HELM_CACHE_HOME", "HELM_DATA_HOME"):
        env[var] = os.path.join(home, var.lower())
    env.pop("KUBECONFIG", None)
    return subprocess.run(
        [str(helm_binary()), *args],
        capture_output=True,
        text=True,
        timeout=HELM_TIMEOUT_S,
        env=env,
        check=False,
    )


def values_args(value_set: str, sets: tuple[str, ...] = ()) -> list[str]:
    out: list[str] = []
    path = VALUE_SETS[value_set]
    if path is not None:
        out += ["-f", str(path)]
    for s in sets:
        out += ["--set", s]
    return out


def deep_merge(base: Any, override: Any) -> Any:
    """Helm's values merge: maps merge recursively, anything else replaces, null deletes."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif key in out:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Rendered:
    """The objects `helm template` rendered for one value set, and the values behind them."""

    name: str
    values: dict[str, Any]
    docs: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        return found[0] if found else None

    def role_config(self, role: str) -> dict[str, Any]:
        """The daemon config the chart should give ``role`` (values merged independently)."""
        cfg = deep_merge(self.values["config"], self.values[role].get("config") or {})
        if role == "decode":
            cfg["prefill_policy"] = self.values["decode"]["prefillPolicy"]
        return cfg


@functools.cache
def render(value_set: str, sets: tuple[str, ...] = ()) -> Rendered:
    """`helm template` the chart for a value set (cached: render once per session)."""
    proc = run_helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values_args(value_set, sets)
    )
    assert proc.returncode == 0, f"helm template {value_set} {sets} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if VALUE_SETS[value_set] is not None:
        values = deep_merge(values, yaml.safe_load(VALUE_SETS[value_set].read_text()))
    return Rendered(name=value_set, values=values, docs=docs)


def fullname() -> str:
    return f"{RELEASE}-kvbridge"


def role_labels(role: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kvbridge",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": role,
    }


def container(sts: dict[str, Any]) -> dict[str, Any]:
    containers = sts["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one daemon container per pod"
    return containers[0]


def arg_values(args: list[str], flag: str) -> list[str]:
    """Values of ``--flag=value`` / ``--flag value`` occurrences in a container's args."""
    out = []
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            out.append(a.split("=", 1)[1])
        elif a == flag and i + 1 < len(args):
            out.append(args[i + 1])
    return out


@functools.cache
def notes(value_set: str) -> str:
    """NOTES.txt as `helm install --dry-run=client` renders it (offline, no cluster)."""
    proc = run_helm(
        "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
        "-o", "json", *values_args(value_set),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["info"]["notes"]


def note_commands(text: str, program: str) -> list[list[str]]:
    """Argument lists after ``program`` on every command line of NOTES.txt that runs it."""
    out = []
    for line in text.splitlines():
        if not line.startswith("  ") or line.startswith("   "):
            continue  # commands are indented by two spaces; prose is not
        words = shlex.split(line.split("|")[0])
        if words[0] == program:
            out.append(words[1:])
        elif "--" in words and words[words.index("--") + 1] == program:
            out.append(words[words.index("--") + 2 :])
    return out
