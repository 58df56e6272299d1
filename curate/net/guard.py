"""The address guard: which hosts a download may connect to.

A URL list from the open web can point anywhere, including at the machine that
downloads it (``http://localhost:8265`` -- a Ray dashboard), the cluster's private
network or the cloud's metadata service (``169.254.169.254``, which hands out
credentials).  Following such URLs is server-side request forgery, so by default
only *global unicast* addresses are fetched: loopback, private (RFC 1918, ULA),
link-local, CGNAT (100.64/10), multicast, reserved, unspecified and documentation
ranges are refused, as are IPv4-mapped / 6to4 / Teredo / NAT64 forms of them.
``allow_networks`` opens ranges explicitly (the demo and the tests allow
``127.0.0.0/8`` because their servers run on loopback).

Host names are resolved once; the caller connects to the address that was checked
(no second lookup, so a DNS answer that changes between check and connect --
DNS rebinding -- cannot slip through).  Numeric hosts in any spelling the C
library accepts (``127.1``, ``0x7f000001``, ``2130706433``, ``017700000001``) are
parsed here, without any lookup.
"""

from __future__ import annotations

import concurrent.futures as cf
import ipaddress
import socket
from typing import Callable, Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# host name -> addresses (strings); may raise OSError (socket.gaierror) for unknown names
Resolver = Callable[[str], Sequence[str]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class BlockedAddress(Exception):
    """Every address of a host is outside the allowed ranges."""

    def __init__(self, host: str, address: str, category: str) -> None:
        super().__init__(f"{host} resolves to {address} ({category} address, not allowed; see allow_networks)")
        self.host, self.address, self.category = host, address, category


class ResolveError(Exception):
    """The name could not be resolved (error_type ``dns_error`` or ``timeout``)."""

    def __init__(self, message: str, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


def parse_networks(specs: Iterable[str]) -> list[Network]:
    """``["127.0.0.0/8", "10.1.2.3"]`` -> networks; raises ValueError naming a bad entry."""
    out = []
    for s in specs:
        try:
            out.append(ipaddress.ip_network(str(s).strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"allow_networks: {s!r} is not an IP network ({e})") from None
    return out


def numeric_host(host: str) -> IPAddress | None:
    """The address of a numeric host in any spelling ``inet_aton`` accepts, or None for a name."""
    h = host.strip("[]").split("%")[0]
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if h and all(c in "0123456789abcdefxABCDEFX." for c in h):
        try:  # 127.1, 0x7f000001, 2130706433, 0177.0.0.1: what the C library (and so a browser) connects to
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(ip))
    return None


def category(ip: IPAddress) -> str | None:
    """None for a global unicast address, else why it is not one (``loopback``, ``private``, ...)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            return category(inner)
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "cgnat"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


def system_resolver(timeout: float) -> Resolver:
    """getaddrinfo bounded by ``timeout`` (the C call itself cannot be interrupted: it runs in a thread)."""
    pool = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="curate-dns")

    def resolve(host: str) -> list[str]:
        fut = pool.submit(socket.getaddrinfo, host, None, 0, socket.SOCK_STREAM)
        try:
            infos = fut.result(timeout=timeout)
        except cf.TimeoutError:
            raise ResolveError(f"resolving {host} took more than {timeout:g} s", timeout=True) from None
        return list(dict.fromkeys(str(i[4][0]) for i in infos))

    resolve.pool = pool  # type: ignore[attr-defined]  - shut down by the owner
    return resolve


class AddressGuard:
    """Resolve a host and keep only the addresses a download may connect to."""

    def __init__(self, allow_networks: Iterable[str] = (), resolver: Resolver | None = None,
                 static_hosts: dict[str, list[str]] | None = None, enabled: bool = True,
                 resolve_timeout: float = 10.0) -> None:
        self.allow = parse_networks(allow_networks)
        self.enabled = enabled
        self.static = {k.lower().rstrip("."): [str(a) for a in v] for k, v in (static_hosts or {}).items()}
        self._own_resolver = resolver is None
        self.resolver = resolver or system_resolver(resolve_timeout)

    def close(self) -> None:
        pool = getattr(self.resolver, "pool", None)
        if self._own_resolver and pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def allowed(self, ip: IPAddress) -> str | None:
        """None when ``ip`` may be fetched, else the category that forbids it."""
        if any(ip.version == n.version and ip in n for n in self.allow):
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            if any(n.version == 4 and ip.ipv4_mapped in n for n in self.allow):
                return None
        return category(ip) if self.enabled else None

    def addresses(self, host: str) -> list[str]:
        """The checked addresses to connect to, in resolver order; raises BlockedAddress / ResolveError."""
        host = host.lower().rstrip(".")
        ip = numeric_host(host)
        if ip is not None:
            candidates = [ip]
        else:
            names = self.static.get(host)
            if names is None:
                try:
                    names = list(self.resolver(host))
                except ResolveError:
                    raise
                except (OSError, UnicodeError) as e:
                    raise ResolveError(f"cannot resolve {host}: {e}") from None
            candidates = []
            for a in names:
                try:
                    candidates.append(ipaddress.ip_address(str(a).split("%")[0]))
                except ValueError:
                    continue
            if not candidates:
                raise ResolveError(f"{host} resolves to no address")
        ok, first_bad = [], None
        for c in candidates:
            why = self.allowed(c)
            if why is None:
                ok.append(str(c.ipv4_mapped) if isinstance(c, ipaddress.IPv6Address) and c.ipv4_mapped else str(c))
            elif first_bad is None:
                first_bad = (str(c), why)
        if not ok:
            assert first_bad is not None
            raise BlockedAddress(host, *first_bad)
        return ok
