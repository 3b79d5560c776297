"""What ``promtool check metrics`` checks, on a /metrics text, with prometheus_client's
parser (promtool itself is a Go binary the test machines do not have)."""

from __future__ import annotations

import re

from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families

NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
# non-base units promtool's lint names (it wants seconds and bytes)
BAD_UNITS = ("_milliseconds", "_microseconds", "_nanoseconds", "_kilobytes", "_megabytes",
             "_minutes", "_hours", "_days", "_percent")  # fmt: skip


def lint(text: str) -> list[str]:
    """Problems in a Prometheus text exposition (empty: clean)."""
    problems: list[str] = []
    seen: set[str] = set()
    helps = {m.group(1) for m in re.finditer(r"^# HELP (\S+) \S", text, re.M)}
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for family in text_string_to_metric_families(text):
        name = family.name
        exposed = name + "_total" if family.type == "counter" else name
        if exposed in seen:
            problems.append(f"{exposed}: exposed twice")
        seen.add(exposed)
        if not NAME.match(name):
            problems.append(f"{name}: invalid metric name")
        if exposed not in helps or not family.documentation:
            problems.append(f"{exposed}: no HELP text")
        if exposed not in types:
            problems.append(f"{exposed}: no TYPE line")
        if family.type == "counter" and not all(s.name.endswith("_total") for s in family.samples):
            problems.append(f"{name}: counter samples must end in _total")
        if family.type != "counter" and name.endswith("_total"):
            problems.append(f"{name}: non-counter ends in _total")
        if any(name.endswith(u) or f"{u}_" in name for u in BAD_UNITS):
            problems.append(f"{name}: use base units (seconds, bytes)")
        for s in family.samples:
            if s.name.endswith("_created"):
                problems.append(f"{s.name}: _created series")
            for label in s.labels:
                if not NAME.match(label) or label.startswith("__"):
                    problems.append(f"{s.name}: invalid label name {label!r}")
    return problems


def openmetrics_units(text: str) -> dict[str, str]:
    """``{family: unit}`` of an OpenMetrics exposition (its ``# UNIT`` metadata)."""
    return {f.name: f.unit for f in om_families(text) if f.unit}
