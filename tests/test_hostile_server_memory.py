"""The memory ceiling: worst-case requests at once, the server's RSS watched, its health probe timed.

Four concurrent requests of the largest images the default limits let through (RGBA, the dearest mode to
decode, at the per-image pixel limit) together with a 32 MiB JSON body of empty arrays and the largest
JSON body the value bound lets through. The server must answer each (200, or the 4xx its limits give),
stay under a 2 GiB peak RSS, and answer ``/v2/health/live`` within 100 ms at the 99th percentile
meanwhile. The server runs with its default limits: this is what a deployment gets.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from predictors.settings import ImageLimits, ServerSettings
from tests.fixtures.server import TRAINED_MODELS, ServerHandle, start_model_server
from tests.support.v2 import bytes_tensor

CEILING_BYTES = 2 * 1024**3
HEALTH_P99_S = 0.100
IMAGE_REQUESTS = 4
IMAGES_PER_REQUEST = 2


def _worst_image() -> bytes:
    """A PNG of exactly the default per-image pixel limit, RGBA, a few kilobytes on the wire."""
    side = int(ImageLimits().max_pixels ** 0.5)
    rgba = np.zeros((side, side, 4), dtype=np.uint8)
    rgba[side // 3: side // 2, side // 3: side // 2, 3] = 255  # opaque black ink on transparent paper
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def _json_of_empty_arrays(size: int) -> bytes:
    head = b'{"inputs":[{"name":"input-0","datatype":"FP32","shape":[1,28,28],"data":['
    tail = b"[]]}]}"
    return head + b"[]," * ((size - len(head) - len(tail) - 1024) // 3) + tail


def _json_at_the_value_bound() -> bytes:
    values = ServerSettings().max_json_values - 16
    return (b'{"inputs":[{"name":"input-0","datatype":"FP32","shape":[1,28,28],"data":['
            + b",".join([b"0.5"] * values) + b"]}]}")


class RSSWatch:
    """Samples the server process's resident set (``/proc/<pid>/status``) until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)

    def __enter__(self) -> RSSWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Prober:
    """``GET /v2/health/live`` every 20 ms from a process of its own, so the test's own threads (building
    and sending 32 MiB) do not slow the measurement down; the latencies are read back at exit."""

    SCRIPT = """
import sys, time, httpx
url, out, stop = sys.argv[1:]
with httpx.Client(base_url=url, timeout=10.0) as client, open(out, "w") as f:
    while True:
        start = time.perf_counter()
        assert client.get("/v2/health/live").status_code == 200
        f.write(f"{time.perf_counter() - start}\\n")
        f.flush()
        try:
            open(stop).close()
            break
        except FileNotFoundError:
            time.sleep(0.02)
"""

    def __init__(self, url: str, workdir: Path) -> None:
        self.out, self.stop = workdir / "latencies.txt", workdir / "stop"
        self.process = subprocess.Popen([sys.executable, "-c", self.SCRIPT, url, str(self.out), str(self.stop)])
        self.latencies: list[float] = []

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.touch()
        assert self.process.wait(timeout=30) == 0, "the health probe failed"
        self.latencies = [float(line) for line in self.out.read_text().split()]


@pytest.fixture(scope="module")
def mnist_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    root = tmp_path_factory.mktemp("memory-models")
    shutil.copytree(TRAINED_MODELS / "mnist", root / "mnist")
    with start_model_server(root, tmp_path_factory.mktemp("memory-server")) as handle:
        yield handle


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_worst_case_requests_stay_under_the_ceiling_and_health_answers(mnist_server, tmp_path):
    server = mnist_server
    image = _worst_image()
    image_body = json.dumps({"inputs": [bytes_tensor("input-0", [image] * IMAGES_PER_REQUEST)]}).encode()
    big_json, bounded_json = _json_of_empty_arrays(ServerSettings().max_body_bytes), _json_at_the_value_bound()
    with httpx.Client(base_url=server.http_url, timeout=120.0) as warm:
        assert warm.post("/v2/models/mnist/infer", json={"inputs": [bytes_tensor("input-0", [image])]}
                         ).status_code == 200

    def post(body: bytes) -> httpx.Response:
        with httpx.Client(base_url=server.http_url, timeout=120.0) as client:
            return client.post("/v2/models/mnist/infer", content=body, headers={"content-type": "application/json"})

    with RSSWatch(server.process.pid) as watch, Prober(server.http_url, tmp_path) as prober, \
            ThreadPoolExecutor(IMAGE_REQUESTS + 2) as pool:
        time.sleep(0.5)
        answers = [pool.submit(post, image_body) for _ in range(IMAGE_REQUESTS)]
        big, bounded = pool.submit(post, big_json), pool.submit(post, bounded_json)
        responses = [a.result() for a in answers]
        big_response, bounded_response = big.result(), bounded.result()
    latencies = prober.latencies
    for response in responses:  # decoded, or stopped by the decode deadline: either is an answer
        assert response.status_code == 200 or (response.status_code == 413 and "longer than" in response.text), \
            response.text[:300]
    assert big_response.status_code == 413 and "values" in big_response.json()["error"]
    assert bounded_response.status_code == 400, bounded_response.text[:300]
    assert watch.peak < CEILING_BYTES, f"peak RSS {watch.peak / 2**20:.0f} MiB"
    assert len(latencies) >= 20
    p99 = float(np.percentile(latencies, 99))
    assert p99 < HEALTH_P99_S, f"health p99 {p99 * 1000:.0f} ms over {len(latencies)} probes"
    assert server.process.poll() is None
