"""Fetching images from ``http(s)`` URLs behind a network guard.

A model server that fetches arbitrary URLs is an SSRF hole: it could be pointed at the
cloud metadata service, the Kubernetes API or anything on the pod network. So every
URL is resolved first and refused if any address it resolves to is not globally routable
(:attr:`ipaddress.IPv4Address.is_global`: loopback, link-local, private, shared address space
100.64.0.0/10, documentation and benchmark ranges, multicast, reserved; IPv4 embedded in IPv6
as mapped, compatible, translated, 6to4, NAT64 or Teredo addresses is checked as IPv4; local-use NAT64 is
never public), unless the address falls in an
explicitly allowed network. The connection is then pinned to a checked address (no second DNS
lookup an attacker could rebind); the resolved addresses are tried in turn, IPv4 first unless
configured otherwise (a dual-stack host whose IPv6 route is broken still answers), each checked
again just before connecting. Redirects are followed by hand and each hop is checked again. The
body is streamed unencoded with a size cap on the wire bytes (per image and per request) and a
per-read timeout, and the whole fetch (every hop, DNS, connects, body) runs under one deadline, so
a server dripping bytes cannot hold it open.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import httpx

from predictors.protocol.errors import DisallowedURL, FetchFailed
from predictors.settings import FetchSettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``; the default asks the system resolver (``getaddrinfo``)."""

_LOW_32_BITS = (
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64, the well-known prefix (RFC 6052)
    ipaddress.ip_network("::/96"),  # IPv4-compatible (deprecated, still routed by some stacks)
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT, RFC 2765)
)
"""IPv6 ranges whose last 32 bits are an IPv4 address the packet ends up at."""
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
"""NAT64 for local use (RFC 8215): translated inside the operator's own network, never public."""


def is_url(value: bytes | str) -> bool:
    head = value[:8].lower() if isinstance(value, str) else value[:8].lower().decode("latin-1")
    return head.startswith("http://") or head.startswith("https://")


def _embedded_ipv4(addr: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to (mapped, 6to4, NAT64, Teredo server and client)."""
    if isinstance(addr, ipaddress.IPv4Address):
        return []
    found = [a for a in (addr.ipv4_mapped, addr.sixtofour) if a is not None]
    if any(addr in net for net in _LOW_32_BITS):
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    if addr.teredo is not None:
        found.extend(addr.teredo)
    return found


def _public(addr: IPAddress) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr in _LOCAL_NAT64:
        return False
    return all(a.is_global and not a.is_multicast for a in (addr, *_embedded_ipv4(addr)))


def check_address(address: str, allowed: Sequence[IPNetwork]) -> None:
    """Refuse (``DisallowedURL``) an address that is not global, unless it is in an allowed network."""
    addr = ipaddress.ip_address(address)
    if any(addr in net for net in allowed):
        return
    if not _public(addr):
        raise DisallowedURL(f"address {address} is not a public address (loopback, link-local, private, "
                            "shared or reserved); not allowed")


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``getaddrinfo`` gives for ``host`` (TCP), in its order, without repeats."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchFailed(f"cannot resolve host '{host}': {exc.strerror}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def resolve_checked(host: str, port: int, allowed: Sequence[IPNetwork],
                          resolve: Resolver = system_resolver, ipv6_first: bool = False) -> list[str]:
    """Resolve ``host`` and check every address; return them in the order to try (one family first)."""
    addresses = await resolve(host, port)
    if not addresses:
        raise FetchFailed(f"host '{host}' has no addresses")
    for address in addresses:  # refuse if ANY address is internal: DNS answers can be mixed on purpose
        check_address(address, allowed)
    return sorted(addresses, key=lambda a: (ipaddress.ip_address(a).version == 4) == ipv6_first)


def _parse(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DisallowedURL(f"malformed URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise DisallowedURL(f"URL scheme '{parts.scheme}' is not allowed; use http or https")
    if not parts.hostname:
        raise DisallowedURL("URL has no host")
    if parts.username or parts.password:
        raise DisallowedURL("URLs with credentials are not allowed")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


class ByteBudget:
    """The bytes all fetches of one request may still read together (``max_request_bytes``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def take(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise FetchFailed(f"the images this request names add up to more than the {self.limit}-byte limit")


class _Unreachable(Exception):
    """Connecting to one address failed; the next address may still answer."""


class ImageFetcher:
    """Fetch image bytes from URLs under :class:`FetchSettings`.

    ``resolve`` replaces the system resolver (a host's addresses are the one thing a test on
    loopback cannot get from real DNS); every address it gives still goes through the guard.
    """

    def __init__(self, settings: FetchSettings | None = None, resolve: Resolver = system_resolver) -> None:
        self.settings = settings or FetchSettings()
        self._allowed = self.settings.networks()
        self._resolve = resolve

    def budget(self) -> ByteBudget:
        """A fresh :class:`ByteBudget` for the fetches of one request."""
        return ByteBudget(self.settings.max_request_bytes)

    async def fetch(self, url: str, budget: ByteBudget | None = None) -> bytes:
        """The image at ``url``; ``DisallowedURL`` or ``FetchFailed`` (both 400) otherwise. Every byte read
        also counts against ``budget`` when given (the other images of the same request share it)."""
        if not self.settings.enabled:
            raise DisallowedURL("image URL fetching is disabled on this server")
        if len(url) > 4096:
            raise DisallowedURL("URL is longer than 4096 characters")
        try:
            async with asyncio.timeout(self.settings.deadline_s):
                return await self._follow(url, budget)
        except TimeoutError as exc:
            raise FetchFailed(f"fetching {url} took longer than the {self.settings.deadline_s:g}s limit") from exc

    async def _follow(self, url: str, budget: ByteBudget | None) -> bytes:
        for _ in range(self.settings.max_redirects + 1):
            scheme, host, port = _parse(url)
            addresses = await resolve_checked(host, port, self._allowed, self._resolve,
                                              self.settings.address_order == "ipv6_first")
            failures: list[str] = []
            for address in addresses:
                check_address(address, self._allowed)  # the guard again, right before this connection
                try:
                    response_or_redirect = await self._get_pinned(url, scheme, host, port, address, budget)
                    break
                except _Unreachable as exc:
                    failures.append(f"{address}: {exc}")
            else:
                raise FetchFailed(f"cannot connect to {host} ({'; '.join(failures)[:500]})")
            if isinstance(response_or_redirect, bytes):
                return response_or_redirect
            url = response_or_redirect
        raise FetchFailed(f"more than {self.settings.max_redirects} redirects")

    async def _get_pinned(self, url: str, scheme: str, host: str, port: int, address: str,
                          budget: ByteBudget | None) -> bytes | str:
        """GET ``url`` connecting to the checked ``address``; bytes, or the next URL on a redirect.

        Only unencoded bodies are taken (``Accept-Encoding: identity``; any other ``Content-Encoding`` is
        refused) and the limits count the bytes as they come off the wire: a decoder in between would turn a
        small body of stacked gzip into a huge one in a single chunk, before any limit could look.
        Image formats are compressed already, so an encoding gains nothing.
        """
        s = self.settings
        ip = ipaddress.ip_address(address)
        netloc = f"[{address}]" if ip.version == 6 else address
        target = url.replace(f"{scheme}://", "", 1).split("/", 1)
        path = "/" + target[1] if len(target) > 1 else "/"
        pinned = f"{scheme}://{netloc}:{port}{path}"
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        try:
            async with httpx.AsyncClient(timeout=s.timeout_s, follow_redirects=False, trust_env=False) as client:
                request = client.build_request(
                    "GET", pinned, headers={"Host": host, "Accept": "image/*", "Accept-Encoding": "identity"},
                    extensions=extensions)
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        return str(httpx.URL(url).join(location))
                    if response.status_code != 200:
                        raise FetchFailed(f"fetching {url} returned HTTP {response.status_code}")
                    ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    if ctype not in s.allowed_content_types:
                        raise FetchFailed(f"{url} has content type '{ctype or 'none'}', not an allowed image type")
                    encoding = response.headers.get("content-encoding", "").strip().lower()
                    if encoding not in ("", "identity"):
                        raise FetchFailed(f"{url} is sent with Content-Encoding '{encoding[:40]}'; "
                                          "only unencoded images are fetched")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > s.max_bytes:
                        raise FetchFailed(f"{url} is {declared} bytes; the limit is {s.max_bytes}")
                    body = bytearray()
                    async for chunk in response.aiter_raw():
                        body.extend(chunk)
                        if len(body) > s.max_bytes:
                            raise FetchFailed(f"{url} is larger than the {s.max_bytes}-byte limit")
                        if budget is not None:
                            budget.take(len(chunk))
                    return bytes(body)
                finally:
                    await response.aclose()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Unreachable(str(exc) or type(exc).__name__) from exc
        except httpx.TimeoutException as exc:
            raise FetchFailed(f"fetching {url} timed out after {s.timeout_s}s") from exc
        except httpx.HTTPError as exc:
            raise FetchFailed(f"fetching {url} failed: {exc}") from exc
