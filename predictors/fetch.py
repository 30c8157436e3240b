"""Fetching images from ``http(s)`` URLs behind a network guard.

A model server that fetches arbitrary URLs is an SSRF hole: it could be pointed at the
cloud metadata service, the Kubernetes API or anything on the pod network. So every
URL is resolved first and refused if any address it resolves to is loopback,
link-local, private, multicast, reserved or unspecified, unless the address falls in an
explicitly allowed network. The connection is then pinned to the checked address (no
second DNS lookup an attacker could rebind), redirects are followed by hand and each hop
is checked again, and the body is streamed with a size cap and a timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, Field

from predictors.errors import DisallowedURL, FetchFailed

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchSettings(BaseModel):
    """Limits for image URL fetching (env ``KCP_URL_*``, see predictors.settings)."""

    enabled: bool = True
    timeout_s: float = Field(default=5.0, gt=0)
    max_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    max_redirects: int = Field(default=3, ge=0)
    allowed_networks: list[str] = Field(default_factory=list, description="CIDRs exempt from the private-address ban")
    allowed_content_types: tuple[str, ...] = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp")

    def networks(self) -> list[IPNetwork]:
        return [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]


def is_url(value: bytes | str) -> bool:
    head = value[:8].lower() if isinstance(value, str) else value[:8].lower().decode("latin-1")
    return head.startswith("http://") or head.startswith("https://")


def _public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
                or addr.is_reserved or addr.is_unspecified)


def check_address(address: str, allowed: Sequence[IPNetwork]) -> None:
    addr = ipaddress.ip_address(address)
    if any(addr in net for net in allowed):
        return
    if not _public(addr):
        raise DisallowedURL(f"address {address} is loopback, link-local or private; not allowed")


async def resolve_checked(host: str, port: int, allowed: Sequence[IPNetwork]) -> str:
    """Resolve ``host`` and check every address; return the one to connect to."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchFailed(f"cannot resolve host '{host}': {exc.strerror}") from exc
    addresses = sorted({info[4][0] for info in infos})
    if not addresses:
        raise FetchFailed(f"host '{host}' has no addresses")
    for address in addresses:  # refuse if ANY address is internal: DNS answers can be mixed on purpose
        check_address(address, allowed)
    return addresses[0]


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


class ImageFetcher:
    """Fetch image bytes from URLs under :class:`FetchSettings`."""

    def __init__(self, settings: FetchSettings | None = None) -> None:
        self.settings = settings or FetchSettings()
        self._allowed = self.settings.networks()

    async def fetch(self, url: str) -> bytes:
        if not self.settings.enabled:
            raise DisallowedURL("image URL fetching is disabled on this server")
        if len(url) > 4096:
            raise DisallowedURL("URL is longer than 4096 characters")
        for _ in range(self.settings.max_redirects + 1):
            scheme, host, port = _parse(url)
            address = await resolve_checked(host, port, self._allowed)
            response_or_redirect = await self._get_pinned(url, scheme, host, port, address)
            if isinstance(response_or_redirect, bytes):
                return response_or_redirect
            url = response_or_redirect
        raise FetchFailed(f"more than {self.settings.max_redirects} redirects")

    async def _get_pinned(self, url: str, scheme: str, host: str, port: int, address: str) -> bytes | str:
        """GET ``url`` connecting to the checked ``address``; bytes, or the next URL on a redirect."""
        s = self.settings
        ip = ipaddress.ip_address(address)
        netloc = f"[{address}]" if ip.version == 6 else address
        target = url.replace(f"{scheme}://", "", 1).split("/", 1)
        path = "/" + target[1] if len(target) > 1 else "/"
        pinned = f"{scheme}://{netloc}:{port}{path}"
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        try:
            async with httpx.AsyncClient(timeout=s.timeout_s, follow_redirects=False, trust_env=False) as client:
                request = client.build_request("GET", pinned, headers={"Host": host, "Accept": "image/*"},
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
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > s.max_bytes:
                        raise FetchFailed(f"{url} is {declared} bytes; the limit is {s.max_bytes}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body.extend(chunk)
                        if len(body) > s.max_bytes:
                            raise FetchFailed(f"{url} is larger than the {s.max_bytes}-byte limit")
                    return bytes(body)
                finally:
                    await response.aclose()
        except httpx.TimeoutException as exc:
            raise FetchFailed(f"fetching {url} timed out after {s.timeout_s}s") from exc
        except httpx.HTTPError as exc:
            raise FetchFailed(f"fetching {url} failed: {exc}") from exc
