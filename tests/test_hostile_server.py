"""Hostile input through the real model server: one cheap request must not wedge, bloat or kill it.

One table, one row per hostile request. Each row is sent to the same real server over REST and, where
gRPC has the same door, over gRPC; it asserts the refusal (a 4xx ``{"error"}`` body, or the gRPC code),
that the answer stays small, whatever else the row is about (nothing logged, fetches stopped), and
that the server still answers a good request afterwards. The server runs with small image and fetch
limits set through its environment, so the rows also show that the limits come from the settings.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.server
import io
import json
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from PIL import Image

from tests.fixtures.ports import free_port
from tests.fixtures.server import REPO, TRAINED_MODELS, ServerHandle, start_model_server

SETOSA = [5.1, 3.5, 1.4, 0.2]
MAX_BODY = 8 * 1024 * 1024
IMAGE_MAX_PIXELS = 1_000_000
IMAGE_MAX_TOTAL_PIXELS = 3_000_000
IMAGE_MAX_IMAGES = 32
URL_MAX_REQUEST_BYTES = 3 * 1024 * 1024
SMALL_ANSWER = 4096
"""No refusal needs more than this many bytes to say why."""
LEAK = "postgresql://feedback:hunter2@db.internal:5432"
"""What the leaky package's exception says: a 500 must not pass it on."""


# -- the server and what it fetches ----------------------------------------------------------------


def _png(side: int, ink: bool = True) -> bytes:
    """A real, fully decodable grayscale PNG of ``side``×``side`` (white paper, a dark square as ink)."""
    pixels = np.full((side, side), 255, dtype=np.uint8)
    if ink:
        pixels[side // 3: side // 2, side // 3: side // 2] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris, mnist and iris-katonic, plus ``leaky``: a Katonic package whose predict fails with a message
    that names a database, as user code's exceptions do."""
    root = tmp_path_factory.mktemp("hostile-models")
    for name in ("iris", "mnist", "iris-katonic"):
        shutil.copytree(TRAINED_MODELS / name, root / name)
    leaky = root / "leaky"
    shutil.copytree(TRAINED_MODELS / "iris-katonic", leaky)
    config = (leaky / "config.json").read_text().replace('"name": "iris-katonic"', '"name": "leaky"')
    (leaky / "config.json").write_text(config)
    launch = (leaky / "launch.py").read_text()
    launch = launch.replace('''    return model.predict_proba(features).tolist()''', f'''    if features[0][0] == 42:
        raise RuntimeError("cannot reach {LEAK}")
    return model.predict_proba(features).tolist()''')
    (leaky / "launch.py").write_text(launch)
    return root


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    env = {"KCP_URL_ALLOWED_NETWORKS": "127.0.0.1/32", "KCP_URL_DEADLINE_S": "5",
           "KCP_MAX_BODY_BYTES": str(MAX_BODY), "KCP_IMAGE_MAX_PIXELS": str(IMAGE_MAX_PIXELS),
           "KCP_IMAGE_MAX_TOTAL_PIXELS": str(IMAGE_MAX_TOTAL_PIXELS), "KCP_IMAGE_MAX_IMAGES": str(IMAGE_MAX_IMAGES),
           "KCP_URL_MAX_REQUEST_BYTES": str(URL_MAX_REQUEST_BYTES), "KCP_PREDICTION_LOG_FLUSH_MS": "20"}
    with start_model_server(model_dir, tmp_path_factory.mktemp("hostile-server"), env=env) as handle:
        yield handle


class _Site(http.server.BaseHTTPRequestHandler):
    """Images and traps on loopback. ``/drip.png`` notes when its client hung up."""

    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
    drip_ended: list[float] = []

    def do_GET(self) -> None:
        if self.path == "/drip.png":
            self._drip()
            return
        status, headers, body = self.routes.get(self.path, (404, {"Content-Type": "text/plain"}, b"missing"))
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def _drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"\x00")
                self.wfile.flush()
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.drip_ended.append(time.monotonic())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    png = {"Content-Type": "image/png"}
    bomb = gzip.compress(gzip.compress(b"\x00" * (9 * 1024 * 1024)))  # stacked: a few hundred bytes on the wire
    _Site.routes = {
        "/digit.png": (200, png, _png(28)),
        "/stacked-gzip.png": (200, {**png, "Content-Encoding": "gzip, gzip"}, bomb),
        "/one-mib.png": (200, png, b"\x89PNG" + b"\x00" * (1024 * 1024)),
    }
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# -- the table -------------------------------------------------------------------------------------


@dataclass
class In:
    """One input tensor: BYTES data is ``bytes`` (images: base64 in REST JSON) or ``str`` (URLs, text)."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


@dataclass
class Row:
    """A hostile request and what each protocol must answer (``None``: that protocol has no such door)."""

    model: str
    inputs: list[In] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    request_id: str | None = None
    rest: tuple[int, str] | None = None
    grpc: tuple[grpc.StatusCode, str] | None = None
    send_rest: Callable[[httpx.Client, str], httpx.Response] | None = None
    """A request the JSON form cannot express (headers, chunked or binary bodies); ``(client, site)``."""
    raw_grpc: list[bytes] | None = None
    """``raw_input_contents`` instead of typed contents."""
    check: Callable[[ServerHandle, str], None] | None = None
    """More to assert after both protocols answered; ``(server, request_id)``."""


def iris(rows: list[list[float]] | None = None, datatype: str = "FP32") -> In:
    rows = rows or [SETOSA]
    return In("input-0", datatype, [len(rows), len(rows[0])], [v for row in rows for v in row])


def images(items: list[bytes | str]) -> In:
    return In("input-0", "BYTES", [len(items)], items)


def katonic(*documents: str) -> In:
    return In("data", "BYTES", [len(documents)], list(documents))


def rest_body(row: Row) -> dict[str, Any]:
    def data(tensor: In) -> list[Any]:
        if tensor.datatype != "BYTES":
            return tensor.data
        return [base64.b64encode(v).decode() if isinstance(v, bytes) else v for v in tensor.data]

    body: dict[str, Any] = {"inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.shape, "data": data(t)}
                                       for t in row.inputs]}
    if row.outputs:
        body["outputs"] = [{"name": name} for name in row.outputs]
    if row.request_id is not None:
        body["id"] = row.request_id
    return body


def grpc_request(row: Row) -> pb.ModelInferRequest:
    tensors = []
    for t in row.inputs:
        tensor = pb.ModelInferRequest.InferInputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
        if row.raw_grpc is None:
            if t.datatype == "BYTES":
                tensor.contents.bytes_contents.extend([v if isinstance(v, bytes) else v.encode() for v in t.data])
            else:
                tensor.contents.fp32_contents.extend(t.data)
        tensors.append(tensor)
    return pb.ModelInferRequest(model_name=row.model, id=row.request_id or "", inputs=tensors,
                                outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in row.outputs],
                                raw_input_contents=row.raw_grpc or [])


def binary_rest(json_part: dict[str, Any], binary: bytes, header: bytes | None = None) -> Callable:
    """A binary-extension body: JSON, then raw tensor bytes, the JSON length in the header."""
    document = json.dumps(json_part).encode()

    def send(client: httpx.Client, model: str) -> httpx.Response:
        length = header if header is not None else str(len(document)).encode()
        return client.post(f"/v2/models/{model}/infer", content=document + binary,
                           headers={"inference-header-content-length": length,
                                    "content-type": "application/octet-stream"})

    return send


def chunked(path: str, size: int) -> Callable:
    """A body of ``size`` bytes sent without a Content-Length (chunked), to ``path``."""

    def send(client: httpx.Client, model: str) -> httpx.Response:
        def pieces() -> Iterator[bytes]:
            piece = b" " * (256 * 1024)
            for _ in range(size // len(piece) + 1):
                yield piece

        return client.post(path.format(model=model), content=pieces(), headers={"content-type": "application/json"})

    return send


def raw_bytes_tensor(*items: bytes, truncate: int = 0) -> bytes:
    """The binary BYTES format, with the last ``truncate`` bytes cut off."""
    data = b"".join(struct.pack("<I", len(v)) + v for v in items)
    return data[: len(data) - truncate]


def too_many_values(model: str) -> Callable:
    """A body just under the byte limit that is nothing but empty JSON arrays, the cheapest values to send
    and among the dearest to hold: every ``[],`` is a list object once parsed."""

    def send(client: httpx.Client, _: str) -> httpx.Response:
        head = b'{"inputs":[{"name":"input-0","datatype":"FP32","shape":[1,4],"data":['
        tail = b"[]]}]}"
        count = (MAX_BODY - len(head) - len(tail) - 1024) // 3
        return client.post(f"/v2/models/{model}/infer", content=head + b"[]," * count + tail,
                           headers={"content-type": "application/json"})

    return send


def _not_logged(server: ServerHandle, request_id: str) -> None:
    """The refused request left no row in the prediction log (feedback could otherwise name it)."""
    time.sleep(0.5)  # several flush intervals of the write-behind log
    database = server.env["KCP_FEEDBACK_DB_URL"].removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(database)) as db:
        (count,) = db.execute("SELECT count(*) FROM prediction_log WHERE prediction_id LIKE ?",
                              (f"{request_id}:%",)).fetchone()
    assert count == 0, f"{count} predictions of a refused request were logged"


def _siblings_stopped(server: ServerHandle, request_id: str) -> None:
    """The slow fetch next to the failed one was cancelled, not left running to its deadline."""
    deadline = time.monotonic() + 3.0
    while len(_Site.drip_ended) < 2 and time.monotonic() < deadline:  # one drip per protocol
        time.sleep(0.05)
    assert len(_Site.drip_ended) >= 2, "the slow fetch kept running after its sibling failed"


ROWS: dict[str, Row] = {
    # every requested output is a copy in the answer
    "outputs repeated 5,000 times": Row(
        "iris", [iris()], outputs=["probabilities"] * 5000,
        rest=(400, "at most 64"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "at most 64")),
    "an output requested twice": Row(
        "iris", [iris()], outputs=["probabilities", "label", "probabilities"],
        rest=(400, "requested twice"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "requested twice")),
    # refused before the prediction is logged
    "output ids without input ids": Row(
        "iris", [iris()], outputs=["label", "ids"], request_id="hostile-ids-probe",
        rest=(400, "needs input 'ids'"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "needs input 'ids'"),
        check=_not_logged),
    # ids are stored, logged and echoed: no control characters
    "request id with a NUL byte": Row(
        "iris", [iris()], request_id="abc\x00def",
        rest=(400, "control characters"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "control characters")),
    "ids input with a newline": Row(
        "iris", [iris(), In("ids", "BYTES", [1], ["row\n1"])],
        rest=(400, "control characters"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "control characters")),
    # no silent wrap (gRPC's int64_contents cannot carry 2**63)
    "INT64 of 2**63": Row(
        "iris", [iris([[2**63, 1, 1, 1]], datatype="INT64")], rest=(400, "out of range for INT64")),
    # binary tensor data that ends early
    "truncated raw BYTES tensor": Row(
        "iris-katonic", [In("data", "BYTES", [1], [])],
        send_rest=binary_rest({"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                                           "parameters": {"binary_data_size": 7}}]},
                              struct.pack("<I", 100) + b"abc"),
        raw_grpc=[struct.pack("<I", 100) + b"abc"],
        rest=(400, "claims 100 bytes"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "claims 100 bytes")),
    "raw BYTES tensor with more elements than its shape": Row(
        "iris-katonic", [In("data", "BYTES", [1], [])],
        raw_grpc=[raw_bytes_tensor(b'{"a": 1}', b'{"b": 2}')],
        grpc=(grpc.StatusCode.INVALID_ARGUMENT, "more than the 1 BYTES elements")),
    # the binary extension's length header
    "non-ASCII digit in inference-header-content-length": Row(
        "iris", send_rest=binary_rest({"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4],
                                                   "data": SETOSA}]}, b"", header=b"\xb2"),
        rest=(400, "not a length")),
    # JSON documents in Katonic rows
    "Katonic row nested 5,000 deep": Row(
        "iris-katonic", [katonic("[" * 5000 + "]" * 5000)],
        rest=(400, "element 0"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "element 0")),
    "Katonic row nested 100 deep": Row(
        "iris-katonic", [katonic('{"sepal_length": ' + "[" * 100 + "]" * 100 + "}")],
        rest=(400, "nests deeper"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "nests deeper")),
    # a server fault is named, not described
    "user code failing with a database URL in its message": Row(
        "leaky", [katonic('{"sepal_length": 42, "sepal_width": 3, "petal_length": 1, "petal_width": 0.2}')],
        rest=(500, "internal server error"), grpc=(grpc.StatusCode.INTERNAL, "Internal server error")),
    # a body without a Content-Length
    "chunked /infer body over the limit": Row("iris", send_rest=chunked("/v2/models/{model}/infer", MAX_BODY + 1),
                                              rest=(413, "limit")),
    # the work of parsing a body
    "JSON body of empty arrays": Row("iris", send_rest=too_many_values("iris"), rest=(413, "values")),
    # decoding images
    "one image over the pixel limit": Row(
        "mnist", [images([_png(28), _png(1100)])],
        rest=(400, f"the limit is {IMAGE_MAX_PIXELS}"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "pixels")),
    "more images than the limit": Row(
        "mnist", [images([_png(28)] * (IMAGE_MAX_IMAGES + 1))],
        rest=(413, "encoded images"), grpc=(grpc.StatusCode.RESOURCE_EXHAUSTED, "encoded images")),
    "images over the pixels of a request": Row(
        "mnist", [images([_png(950)] * 4)],
        rest=(413, "pixels together"), grpc=(grpc.StatusCode.RESOURCE_EXHAUSTED, "pixels together")),
    # fetching image URLs
    "stacked gzip image URL": Row(
        "mnist", [images(["{site}/stacked-gzip.png"])],
        rest=(400, "Content-Encoding"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "Content-Encoding")),
    "image URLs adding up over the request's bytes": Row(
        "mnist", [images(["{site}/one-mib.png"] * 4)],
        rest=(400, "add up to more than"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "add up to more than")),
    # IPv4 inside IPv6, and local-use NAT64
    "IPv4-compatible loopback URL": Row(
        "mnist", [images(["http://[::7f00:1]/x.png"])],
        rest=(400, "not a public address"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "not a public address")),
    "IPv4-translated metadata-service URL": Row(
        "mnist", [images(["http://[::ffff:0:a9fe:a9fe]/x.png"])],
        rest=(400, "not a public address"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "not a public address")),
    "local-use NAT64 URL": Row(
        "mnist", [images(["http://[64:ff9b:1::a9fe:a9fe]/x.png"])],
        rest=(400, "not a public address"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "not a public address")),
    "a failed fetch next to a slow one": Row(
        "mnist", [images(["{site}/drip.png", "{site}/missing.png"])],
        rest=(400, "HTTP 404"), grpc=(grpc.StatusCode.INVALID_ARGUMENT, "HTTP 404"), check=_siblings_stopped),
}


def _with_site(row: Row, site: str) -> Row:
    inputs = [In(t.name, t.datatype, t.shape, [v.format(site=site) if isinstance(v, str) and "{site}" in v else v
                                             for v in t.data]) for t in row.inputs]
    return Row(**{**row.__dict__, "inputs": inputs})


@pytest.fixture(scope="module")
def clients(server: ServerHandle) -> Iterator[tuple[httpx.Client, Any]]:
    with server.client() as client, grpc.insecure_channel(server.grpc_target) as channel:
        yield client, pb_grpc.GRPCInferenceServiceStub(channel)


def _still_serving(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    good = client.post("/v2/models/iris/infer", json={"inputs": [{"name": "input-0", "datatype": "FP32",
                                                                   "shape": [1, 4], "data": SETOSA}]})
    assert good.status_code == 200, good.text


@pytest.mark.parametrize("name", list(ROWS))
def test_hostile_request_is_refused_and_the_server_keeps_serving(server, clients, site, name):
    client, stub = clients
    row = _with_site(ROWS[name], site)
    request_id = row.request_id or f"hostile-{uuid.uuid4().hex[:8]}"
    _Site.drip_ended.clear()
    if row.rest is not None:
        status, fragment = row.rest
        if row.send_rest is not None:
            response = row.send_rest(client, row.model)
        else:
            response = client.post(f"/v2/models/{row.model}/infer", json=rest_body(row))
        assert response.status_code == status, response.text[:500]
        assert response.headers["content-type"].startswith("application/json")
        assert len(response.content) < SMALL_ANSWER
        assert list(response.json()) == ["error"] and fragment in response.json()["error"], response.text[:500]
        assert LEAK not in response.text
    if row.grpc is not None:
        code, fragment = row.grpc
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(grpc_request(row), timeout=60)
        assert refused.value.code() == code, refused.value.details()
        assert fragment in refused.value.details() and len(refused.value.details()) < SMALL_ANSWER
        assert LEAK not in refused.value.details()
    if row.check is not None:
        row.check(server, request_id)
    _still_serving(client)


def test_bool_elements_must_be_booleans():
    """BOOL is a protocol datatype no served package declares an input of, so it is checked at the codec
    (the one decoder every request goes through): 0.5 is not a boolean, whatever ``bool()`` makes of it."""
    from predictors.protocol.codecs import to_numpy
    from predictors.protocol.errors import BadInput
    from predictors.protocol.v2 import Tensor

    assert to_numpy(Tensor("b", "BOOL", [3], data=[True, False, 1])).tolist() == [True, False, True]
    for bad in ([0.5], [2], ["true"]):
        with pytest.raises(BadInput, match="BOOL elements must be true or false"):
            to_numpy(Tensor("b", "BOOL", [1], data=bad))


def test_decoding_stops_at_the_request_deadline():
    """The decode deadline is checked before every image and step; a spent budget refuses the next one."""
    from predictors.models.preprocessing import DecodeBudget, run_image_pipeline
    from predictors.package import load_package
    from predictors.protocol.errors import PayloadTooLarge

    steps = load_package(TRAINED_MODELS / "mnist").config.preprocessing
    budget = DecodeBudget(IMAGE_MAX_PIXELS, IMAGE_MAX_TOTAL_PIXELS, deadline_s=0.05)
    assert run_image_pipeline(_png(28), steps, budget).shape == (28, 28)
    time.sleep(0.1)
    with pytest.raises(PayloadTooLarge, match=r"longer than the 0\.05s limit"):
        run_image_pipeline(_png(28), steps, budget)


# -- metrics, auth ---------------------------------------------------------------------------------


def _model_labels(metrics: str) -> set[str]:
    return {line.split('model="', 1)[1].split('"', 1)[0] for line in metrics.splitlines()
            if line.startswith("classifier_requests_total{")}


def test_unknown_model_names_add_no_metric_series(server, clients):
    client, stub = clients
    before = len(client.get("/metrics").content)
    names = [f"no-such-model-{i}" for i in range(40)]
    for name in names:
        assert client.post(f"/v2/models/{name}/infer", json={"inputs": []}).status_code == 404
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(pb.ModelInferRequest(model_name=name), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    metrics = client.get("/metrics").text
    labels = _model_labels(metrics)
    assert "_unknown" in labels and not labels & set(names)
    assert len(metrics.encode()) - before < 4096


@pytest.fixture(scope="module")
def iris_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("iris-only")
    shutil.copytree(TRAINED_MODELS / "iris", root / "iris")
    return root


NON_ASCII_KEY = "s3cret-clé"


def test_requests_without_the_key_add_no_metric_series(iris_only, tmp_path):
    """And a key outside ASCII works over REST (sent as UTF-8, as the key file holds it)."""
    with start_model_server(iris_only, tmp_path, api_key=NON_ASCII_KEY) as keyed, \
            httpx.Client(base_url=keyed.http_url, timeout=30.0,
                         headers={"X-API-Key": NON_ASCII_KEY.encode()}) as client:
        body = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4], "data": SETOSA}]}
        assert client.post("/v2/models/iris/infer", json=body).status_code == 200
        bearer = {"Authorization": b"Bearer " + NON_ASCII_KEY.encode()}
        assert httpx.post(f"{keyed.http_url}/v2/models/iris/infer", json=body, headers=bearer).status_code == 200
        names = [f"guess-{i}" for i in range(40)]
        anonymous = httpx.Client(base_url=keyed.http_url, timeout=30.0)
        with anonymous, grpc.insecure_channel(keyed.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for name in [*names, "iris"]:
                assert anonymous.post(f"/v2/models/{name}/infer", json={}).status_code == 401
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ModelInfer(pb.ModelInferRequest(model_name=name), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        labels = _model_labels(client.get("/metrics").text)
        assert "_unauthenticated" in labels and not labels & set(names)


def test_an_empty_key_file_is_refused_at_start(iris_only, tmp_path):
    """A Secret mounted before it was filled in must stop the server, not serve without a key."""
    empty = tmp_path / "api-key"
    empty.write_text("\n")
    env = {**_base_env(tmp_path), "KCP_API_KEY": "s3cret", "KCP_API_KEY_FILE": str(empty)}
    cmd = [sys.executable, "-m", "predictors", "serve", "--model_dir", str(iris_only), "--host", "127.0.0.1",
           "--http_port", str(free_port()), "--grpc_port", str(free_port())]
    try:
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the server started (and served) with an empty API key file")
    assert done.returncode != 0
    assert "is empty" in done.stderr + done.stdout


def _base_env(tmp_path: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("KCP_API_KEY")}
    return {**env, "KCP_FEEDBACK_DB_URL": f"sqlite:///{tmp_path / 'feedback.db'}"}


def test_serving_without_a_key_beyond_loopback_warns(iris_only, tmp_path):
    with start_model_server(iris_only, tmp_path, extra_args=["--host", "0.0.0.0"]) as handle:
        assert "without an API key" in handle.log()
    (tmp_path / "loopback").mkdir()
    with start_model_server(iris_only, tmp_path / "loopback") as handle:
        assert "without an API key" not in handle.log()


def test_prediction_ids_cannot_be_guessed_from_one_another(clients):
    """Feedback names a prediction by its id: knowing one's own must not tell the next one."""
    client, _ = clients
    body = {"id": "same-request-id", "outputs": [{"name": "prediction_id"}],
            "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4], "data": SETOSA}]}
    first, second = (client.post("/v2/models/iris/infer", json=body).json()["outputs"][0]["data"][0]
                     for _ in range(2))
    server_parts = [pid.removeprefix("same-request-id:") for pid in (first, second)]
    assert all(len(part) >= 12 + 1 + 16 for part in server_parts), server_parts
    assert server_parts[0][-16:] != server_parts[1][-16:]
