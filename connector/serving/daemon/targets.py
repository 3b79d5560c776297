"""``--prefill`` targets: gRPC target URIs and how they resolve to addresses.

Accepted forms (the gRPC naming syntax, without ``unix:``):

* ``HOST:PORT``: a DNS name (re-resolved) or an IP literal (``[v6]:PORT`` for IPv6);
* ``dns:///HOST:PORT`` (also ``dns://AUTHORITY/HOST:PORT``, the authority is ignored):
  a DNS name, re-resolved;
* ``ipv4:A:PORT,B:PORT,...`` and ``ipv6:[A]:PORT,...``: a fixed list of addresses.

A DNS name resolves to all of its IPv4 addresses (its IPv6 ones when it has no IPv4
address), each a separate peer: a headless Service name lists every ready pod.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass

Resolver = Callable[[str, int], list[str]]


def _port(text: str, whole: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"{whole!r}: port {text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{whole!r}: port {port} is outside 1..65535")
    return port


def _split_hostport(text: str, whole: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{whole!r} is not HOST:PORT ([IPv6]:PORT)")
        return host, _port(rest[1:], whole)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{whole!r} is not HOST:PORT")
    if ":" in host:
        raise ValueError(f"{whole!r}: write an IPv6 address as [ADDRESS]:PORT")
    return host, _port(port, whole)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def address(host: str, port: int) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6): a pool key and a gRPC dial target."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Target:
    """One ``--prefill`` value: fixed ``addresses``, or a DNS ``name`` and ``port``."""

    text: str
    name: str = ""
    port: int = 0
    addresses: tuple[str, ...] = ()

    @property
    def dynamic(self) -> bool:
        return bool(self.name)

    def resolve(self, resolver: Resolver | None = None) -> list[str]:
        """Addresses now (fixed ones, or the name's; empty when the name does not resolve)."""
        if not self.dynamic:
            return list(self.addresses)
        return (resolver or resolve_name)(self.name, self.port)


def parse_target(text: str) -> Target:
    """Parse one ``--prefill`` value; ``ValueError`` says what is wrong."""
    text = text.strip()
    low = text.lower()
    if low.startswith(("ipv4:", "ipv6:")):
        family, rest = low[:4], text[5:]
        out = []
        for item in rest.split(","):
            host, port = _split_hostport(item.strip(), text)
            ip = _ip(host)
            if ip is None or f"ipv{ip.version}" != family:
                raise ValueError(f"{text!r}: {host!r} is not an {family.upper()} address")
            out.append(address(str(ip), port))
        return Target(text, addresses=tuple(dict.fromkeys(out)))
    if low.startswith("dns:"):
        rest = text[4:]
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]  # drop the authority
        host, port = _split_hostport(rest, text)
    elif "://" in text or low.startswith("unix:"):
        raise ValueError(f"{text!r}: use HOST:PORT, dns:///HOST:PORT or ipv4:/ipv6: lists")
    else:
        host, port = _split_hostport(text, text)
    ip = _ip(host)
    if ip is not None:
        return Target(text, addresses=(address(str(ip), port),))
    return Target(text, name=host, port=port)


def resolve_name(name: str, port: int) -> list[str]:
    """IPv4 addresses of ``name`` (IPv6 when it has none), sorted; [] if it does not resolve."""
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    v4 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET})
    v6 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET6})
    return [address(h, port) for h in (v4 or v6)]
