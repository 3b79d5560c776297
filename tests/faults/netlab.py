"""A test network: one namespace joined to the root namespace by a veth pair.

The namespace side (``ns_addr``) hosts a prefill daemon; the root side
(``host_addr``) the decode daemon and the test. Faults act on the namespace's end
of the link, so the test keeps its own connectivity to both daemons' metrics:

* ``shape(rate)``: ``tc tbf`` rate limit of the namespace's egress (KV bytes of a
  pull flow prefill -> decode);
* ``down()`` / ``up()``: link down in the namespace (a partition);
* ``drop(percent)``: nftables ``numgen random`` drop of that share of packets in
  and out of the namespace.

Names are unique per lab; ``close()`` deletes the namespace, which removes its
veth end (and the pair), its qdiscs and its nftables tables, even after a failure.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

_COUNTER = itertools.count()


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=20)


def unavailable() -> str:
    """Why the lab cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            return f"the {tool!r} tool is not installed (iproute2 / nftables)"
    return ""


class NetLab:
    """A namespace with a veth to the root namespace, addresses 10.213.N.{1,2}/30."""

    def __init__(self) -> None:
        n = (os.getpid() * 7 + next(_COUNTER)) % 250 + 1
        tag = f"{os.getpid() % 10000}x{next(_COUNTER)}"
        self.ns = f"kvf{tag}"
        self.host_dev, self.ns_dev = f"kvfh{tag}", f"kvfn{tag}"
        self.host_addr, self.ns_addr = f"10.213.{n}.1", f"10.213.{n}.2"
        self._made = False
        try:
            _run("ip", "netns", "add", self.ns)
            self._made = True
            _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
            _run("ip", "link", "set", self.ns_dev, "netns", self.ns)
            _run("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_dev)
            _run("ip", "link", "set", self.host_dev, "up")
            self.ip("addr", "add", f"{self.ns_addr}/30", "dev", self.ns_dev)
            self.ip("link", "set", self.ns_dev, "up")
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- plumbing
    @property
    def wrap(self) -> list[str]:
        """Command prefix that runs a process inside the namespace."""
        return ["ip", "netns", "exec", self.ns]

    def ip(self, *args: str) -> None:
        _run("ip", "-n", self.ns, *args)

    def tc(self, *args: str, check: bool = True) -> None:
        _run("ip", "netns", "exec", self.ns, "tc", *args, check=check)

    def nft(self, script: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.ns, "nft", "-f", "-"],
            input=script, check=True, capture_output=True, text=True, timeout=20,
        )  # fmt: skip

    # ---------------------------------------------------------------- faults
    def shape(self, rate: str = "2mbit", burst: str = "16kb", latency: str = "400ms") -> None:
        """Rate-limit the namespace's egress with a token bucket."""
        self.tc("qdisc", "replace", "dev", self.ns_dev, "root", "tbf",
                "rate", rate, "burst", burst, "latency", latency)  # fmt: skip

    def unshape(self) -> None:
        self.tc("qdisc", "del", "dev", self.ns_dev, "root", check=False)

    def down(self) -> None:
        self.ip("link", "set", self.ns_dev, "down")

    def up(self) -> None:
        self.ip("link", "set", self.ns_dev, "up")

    def drop(self, percent: int) -> None:
        """Drop ``percent`` % of the packets entering and leaving the namespace."""
        if not 0 < percent < 100:
            raise ValueError(f"drop percentage must lie in (0, 100), got {percent}")
        self.undrop()
        rule = f"numgen random mod 100 < {percent} drop"
        self.nft(
            "table inet kvbfault {\n"
            f"  chain in {{ type filter hook input priority 0; policy accept; {rule}; }}\n"
            f"  chain out {{ type filter hook output priority 0; policy accept; {rule}; }}\n"
            "}\n"
        )

    def undrop(self) -> None:
        _run("ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", "kvbfault",
             check=False)  # fmt: skip

    def close(self) -> None:
        """Delete everything (idempotent; safe after a partial setup)."""
        if self._made:
            _run("ip", "netns", "del", self.ns, check=False)
            self._made = False
        _run("ip", "link", "del", self.host_dev, check=False)  # gone with the namespace's end

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
