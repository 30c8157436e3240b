"""The image fetcher against real HTTP servers on loopback: the deadline, the address order and fallback.

Loopback addresses are admitted through the allow-list, as an operator would admit an internal
image store. The resolver is the one part replaced (real DNS cannot give a test host both
loopback addresses); every address it returns still passes the guard, and every connection is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from predictors.protocol.errors import DisallowedURL, FetchFailed
from predictors.protocol.fetch import FetchSettings, ImageFetcher
from tests.fixtures.ports import free_port

LOOPBACKS = ["127.0.0.0/8", "::1/128"]


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/who.png`` answers the address family it was reached on; ``/drip.png`` sends a byte every 0.1 s."""

    def do_GET(self) -> None:
        family = b"v6" if ":" in self.server.server_address[0] else b"v4"
        length = 600 if self.path == "/drip.png" else len(family)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if self.path != "/drip.png":
                self.wfile.write(family)
                return
            for _ in range(length):  # a minute of dripping unless the client hangs up first
                self.wfile.write(b"\x00")
                self.wfile.flush()
                time.sleep(0.1)

    def log_message(self, *args: object) -> None:
        pass


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


@contextlib.contextmanager
def serving(server: http.server.ThreadingHTTPServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str, addresses: list[str] | None = None, **settings: object) -> bytes:
    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses or [host])

    fetcher = ImageFetcher(FetchSettings(allowed_networks=LOOPBACKS, **settings), resolve=resolve)
    return asyncio.run(fetcher.fetch(url))


def test_a_dripping_server_is_cut_off_by_the_deadline() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    with serving(server):
        url = f"http://127.0.0.1:{server.server_address[1]}/drip.png"
        # every read arrives well within the 5 s read timeout; only the overall deadline ends it
        with pytest.raises(FetchFailed, match=r"longer than the 1\.5s limit"):
            fetch(url, timeout_s=5.0, deadline_s=1.5)


def test_addresses_are_tried_in_order_ipv4_first_with_fallback() -> None:
    port = free_port()
    v6 = _V6Server(("::1", port), _Handler)
    v4 = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    url = f"http://dual.example:{port}/who.png"
    both = ["::1", "127.0.0.1"]  # the resolver's order: IPv6 first
    with serving(v6):
        with serving(v4):
            assert fetch(url, both) == b"v4"
            assert fetch(url, both, address_order="ipv6_first") == b"v6"
        assert fetch(url, both) == b"v6"  # IPv4 refuses now: the next address answers
    with pytest.raises(FetchFailed, match=r"cannot connect to dual\.example"):
        fetch(url, both)


@pytest.mark.parametrize("addresses", [["93.184.216.34", "100.64.0.1"], ["64:ff9b::a9fe:a9fe"],
                                       ["2002:a00:1::1"], ["224.0.0.1"], ["198.18.0.1"]])
def test_a_host_with_any_non_global_address_is_refused(addresses: list[str]) -> None:
    with pytest.raises(DisallowedURL, match="not a public address"):
        fetch("http://mixed.example/x.png", addresses)
