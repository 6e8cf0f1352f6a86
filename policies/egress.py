"""Network egress for URL arguments, in one of two modes:

- `public` (the default): deny loopback, private, link-local, metadata and other non-global addresses, in
  every encoding a resolver accepts, unless the host or network is listed as an exception;
- `allowlist`: only listed hosts (globs) and networks (CIDR) are reachable; everything else is denied.

Pure: the caller resolves host names (the executor uses anyio.getaddrinfo) and passes the addresses in. A
host is resolved only when its verdict depends on its addresses (`needs_resolution`): a URL refused on its
face, an allow-listed host, an address literal, or (allow-list mode) a name no listed network could admit
is judged without a lookup, so a denied call does not leak the name through DNS.
Literal hosts are parsed the way `inet_aton` does (`127.1`, `2130706433`, `0x7f.0.0.1`, octal parts), so
that what a server's resolver would connect to is what gets judged.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

URL_SCHEMES = frozenset({"http", "https", "ws", "wss"})
# Schemes that reach a network host; strings starting with them are URL arguments wherever they appear.
NETWORK_SCHEMES = URL_SCHEMES | {
    "ftp",
    "ftps",
    "sftp",
    "gopher",
    "dict",
    "ldap",
    "ldaps",
    "tftp",
    "smb",
    "telnet",
}
_SCHEME = re.compile(r"^\s*([a-zA-Z][a-zA-Z0-9+.-]*):", re.ASCII)
_NAMES_LOCAL = ("localhost", "*.localhost", "*.local", "*.internal", "metadata", "metadata.google.internal")

# Not covered (or not reliably) by `is_global` on every Python: carrier-grade NAT, benchmarking, 6to4 relay.
_EXTRA_BLOCKED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("192.88.99.0/24"),
    ipaddress.ip_network("fd00::/8"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fec0::/10"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


EgressMode = Literal["public", "allowlist"]


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    allow_hosts: tuple[str, ...] = ()  # host globs let through without an address check
    allow_networks: tuple[IPNetwork, ...] = ()  # addresses inside are let through
    url_args: tuple[str, ...] = ()  # argument names (globs) that must hold URLs with an allowed scheme
    schemes: frozenset[str] = field(default=URL_SCHEMES)
    mode: EgressMode = "public"  # allowlist: nothing but allow_hosts / allow_networks is reachable

    @classmethod
    def of(
        cls,
        allow: Iterable[str] = (),
        url_args: Iterable[str] = (),
        schemes: Iterable[str] = URL_SCHEMES,
        mode: EgressMode = "public",
    ) -> EgressPolicy:
        """`allow` mixes host globs and CIDR networks."""
        hosts, nets = [], []
        for entry in allow:
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.append(entry.lower().rstrip("."))
        return cls(tuple(hosts), tuple(nets), tuple(url_args), frozenset(s.lower() for s in schemes), mode)


@dataclass(frozen=True, slots=True)
class UrlTarget:
    """A URL argument taken apart: the host to resolve, or the reason it is refused outright."""

    where: str
    url: str
    host: str | None
    literal: tuple[IPAddress, ...]  # the host is an address literal (in any encoding) when non-empty
    allowed_host: bool  # the host matches an allow-listed glob
    problem: str | None


def url_values(arguments: Mapping[str, Any], url_args: Sequence[str]) -> Iterator[tuple[str, str, bool]]:
    """Yield (argument path, value, declared) for strings that are (or must be) network URLs."""
    stack: list[tuple[Any, str, bool]] = [(arguments, "", False)]
    while stack:
        value, where, declared = stack.pop()
        if isinstance(value, str):
            m = _SCHEME.match(value)
            if declared or (m and m.group(1).lower() in NETWORK_SCHEMES):
                yield where or "arguments", value, declared
        elif isinstance(value, Mapping):
            for key, child in value.items():
                d = declared or any(fnmatchcase(str(key), p) for p in url_args)
                stack.append((child, f"{where}.{key}" if where else str(key), d))
        elif isinstance(value, list | tuple):
            for i, child in enumerate(value):
                stack.append((child, f"{where}[{i}]", declared))


def has_urls(arguments: Mapping[str, Any], url_args: Sequence[str]) -> bool:
    """Cheap pre-check for `url_values`: any string that could be a URL argument at all."""
    if url_args:
        return True
    stack: list[Any] = [arguments]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if ":" in value and (m := _SCHEME.match(value)) and m.group(1).lower() in NETWORK_SCHEMES:
                return True
        elif type(value) is dict or isinstance(value, Mapping):  # dict first: no ABC check per call
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return False


def parse_target(where: str, url: str, policy: EgressPolicy) -> UrlTarget:
    def refuse(reason: str) -> UrlTarget:
        return UrlTarget(where, url, None, (), False, reason)

    if any(ord(c) < 0x21 or c in "\\\x7f" for c in url.strip()):
        # Parsers disagree on backslashes and whitespace in URLs (WHATWG vs RFC 3986): refuse ambiguity.
        return refuse(f"URL in {where} contains whitespace, control characters or backslashes")
    m = _SCHEME.match(url)
    scheme = m.group(1).lower() if m else ""
    if scheme not in policy.schemes:
        return refuse(f"URL scheme {scheme or '(none)'!r} in {where} is not allowed")
    try:
        parts = urlsplit(url.strip())
        raw_host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        return refuse(f"URL in {where} is malformed: {exc}")
    if not raw_host:
        return refuse(f"URL in {where} has no host")
    host = normalise_host(raw_host)
    if host is None:
        return refuse(f"URL host in {where} cannot be normalised")
    allowed = any(fnmatchcase(host, pattern) for pattern in policy.allow_hosts)
    literal = literal_addresses(host)
    if not allowed and not literal and any(fnmatchcase(host, p) for p in _NAMES_LOCAL):
        return UrlTarget(where, url, host, (), False, f"host {host!r} in {where} is a local name")
    if policy.mode == "allowlist" and not allowed and not literal and not policy.allow_networks:
        # No listed network could admit it: refused by name, without resolving it.
        return UrlTarget(
            where, url, host, (), False, f"host {host!r} in {where} is not on the egress allow-list"
        )
    return UrlTarget(where, url, host, literal, allowed, None)


def needs_resolution(target: UrlTarget) -> bool:
    """Whether the verdict on `target` depends on the addresses its host resolves to."""
    return target.problem is None and not target.allowed_host and not target.literal and bool(target.host)


def normalise_host(raw: str) -> str | None:
    """Percent-decode, NFKC-fold (fullwidth digits and dots), IDNA-encode and drop a trailing dot."""
    host = unquote(raw)
    host = unicodedata.normalize("NFKC", host).replace("\u3002", ".").lower().strip("[]")
    host = host.rstrip(".")
    if not host:
        return None
    if ":" in host:  # IPv6 literal, maybe with a zone id
        return host.split("%", 1)[0]
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host if host.isascii() else None


def literal_addresses(host: str) -> tuple[IPAddress, ...]:
    """Addresses a host string denotes by itself, in any encoding `inet_aton`/`inet_pton` accept."""
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        try:
            return (ipaddress.IPv4Address(socket.inet_aton(host)),)
        except OSError:
            return ()
    return ()


def address_problem(addr: IPAddress) -> str | None:
    """Why connecting to `addr` is not allowed, or None for a public address."""
    embedded = _embedded_v4(addr)
    if embedded is not None:
        inner = address_problem(embedded)
        return f"{inner} (embedded in {addr})" if inner else None
    if addr.is_loopback:
        return f"{addr} is a loopback address"
    if addr.is_link_local:
        return f"{addr} is a link-local address (cloud metadata lives here)"
    if addr.is_unspecified:
        return f"{addr} is the unspecified address"
    if addr.is_multicast:
        return f"{addr} is a multicast address"
    for net in _EXTRA_BLOCKED:
        if addr.version == net.version and addr in net:
            return f"{addr} is in the non-public network {net}"
    if addr.is_private or addr.is_reserved or not addr.is_global:
        return f"{addr} is a private or reserved address"
    return None


def _embedded_v4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(addr, ipaddress.IPv6Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    # IPv4-compatible (deprecated, ::a.b.c.d) still routes to the v4 address on some stacks.
    if int(addr) >> 32 == 0 and int(addr) > 1:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def egress_problem(target: UrlTarget, resolved: Sequence[IPAddress], policy: EgressPolicy) -> str | None:
    """Judge one URL given the addresses its host resolved to (empty: it did not resolve)."""
    if target.problem is not None:
        return target.problem
    if target.allowed_host:
        return None
    addresses = target.literal or tuple(resolved)
    if not addresses:
        return f"host {target.host!r} in {target.where} did not resolve"
    if policy.mode == "allowlist":
        for addr in addresses:
            if not any(addr.version == net.version and addr in net for net in policy.allow_networks):
                return f"URL in {target.where} reaches {addr}, which is not on the egress allow-list"
        return None
    for addr in addresses:
        if any(addr.version == net.version and addr in net for net in policy.allow_networks):
            continue
        problem = address_problem(addr)
        if problem is not None:
            return f"URL in {target.where} reaches a forbidden address: {problem}"
    return None
