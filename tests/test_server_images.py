"""Image inputs end to end: tensors, encoded images, URLs behind the network guard, and bad images."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.digits import photo_of_digit
from tests.fixtures.server import start_model_server
from tests.support.v2 import bytes_tensor, output, png_bytes, tensor


@pytest.fixture(scope="module")
def client(model_server):
    with model_server.client() as c:
        yield c


def infer(client, inputs: list[dict], model: str = "mnist"):
    return client.post(f"/v2/models/{model}/infer", json={"inputs": inputs})


def test_fp32_uint8_and_channel_last_tensors_agree(client, mnist_digits):
    images, labels = mnist_digits
    batch = images[:20]
    as_fp32 = infer(client, [tensor("input-0", batch / 255.0, "FP32")]).json()
    as_uint8 = infer(client, [tensor("input-0", batch, "UINT8")]).json()
    as_nhwc = infer(client, [tensor("input-0", batch[..., None] / 255.0, "FP32")]).json()
    predicted = output(as_fp32, "label")
    assert (predicted == labels[:20]).mean() >= 0.9
    assert np.array_equal(predicted, output(as_uint8, "label"))
    assert np.array_equal(predicted, output(as_nhwc, "label"))


def test_batch_of_base64_images_keeps_each_id(client, mnist_digits):
    images, labels = mnist_digits
    ids = [f"scan-{i:03d}" for i in range(30)]
    body = [bytes_tensor("input-0", [png_bytes(img) for img in images[:30]]),
            {"name": "ids", "datatype": "BYTES", "shape": [30], "data": ids}]
    response = infer(client, body).json()
    assert output(response, "ids").tolist() == ids
    assert (output(response, "label") == labels[:30]).mean() >= 0.9


def test_dark_digit_photo_on_white_larger_and_off_centre_is_classified(client, mnist_digits):
    """The case the original MNIST API got wrong: a photo of a digit on paper, not an MNIST array."""
    images, labels = mnist_digits
    rng = np.random.default_rng(7)
    photos = [photo_of_digit(images[i], rng, fmt="JPEG" if i % 2 else "PNG") for i in range(20)]
    assert Image.open(io.BytesIO(photos[0])).size == (400, 300)
    response = infer(client, [bytes_tensor("input-0", photos)]).json()
    correct = output(response, "label") == labels[:20]
    assert correct.mean() >= 0.9, f"labels {labels[:20].tolist()} predicted {output(response, 'label').tolist()}"


def test_rgba_png_with_transparent_background(client, mnist_digits):
    images, labels = mnist_digits
    digit = images[3]
    rgba = np.zeros((56, 90, 4), dtype=np.uint8)
    ink = np.asarray(Image.fromarray(digit).resize((56, 56)))
    rgba[:, 20:76, 3] = ink  # black ink, opaque only where the digit is
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    response = infer(client, [bytes_tensor("input-0", [buffer.getvalue()])]).json()
    assert output(response, "label").tolist() == [labels[3]]


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width``×``height`` (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BAD_IMAGES = {
    "not-an-image": (b"this is plain text, not a picture", "not a valid"),
    "empty": (b"", "empty"),
    "truncated-png": (None, "not a valid"),
    "decompression-bomb": (_png_with_size(60000, 60000), "pixels"),
    "too-many-bytes": (b"\x89PNG" + b"\x00" * (10 * 1024 * 1024 + 10), "limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_400(client, mnist_digits, case):
    data, message = BAD_IMAGES[case]
    if data is None:
        data = png_bytes(np.kron(mnist_digits[0][0], np.ones((4, 4), dtype=np.uint8)))[:300]
    response = infer(client, [bytes_tensor("input-0", [png_bytes(mnist_digits[0][0]), data])])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "element 1" in error and message in error


@pytest.mark.parametrize("inputs, message", [
    ([{"name": "input-0", "datatype": "BYTES", "shape": [1], "data": ["***not base64***"]}], "not base64"),
    ([{"name": "input-0", "datatype": "FP32", "shape": [1, 27, 27], "data": [0.0] * 729}], "shape [N, 28, 28]"),
    ([{"name": "input-0", "datatype": "FP32", "shape": [1, 28, 28], "data": [2.0] * 784}], "[0, 1]"),
    ([{"name": "input-0", "datatype": "INT32", "shape": [1, 28, 28], "data": [0] * 784}], "FP32, UINT8 or BYTES"),
    ([{"name": "input-0", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}], "shape [N] or [N, 1]"),
    ([{"name": "input-0", "datatype": "UINT8", "shape": [1, 28, 28], "data": [300] * 784}], "out of range"),
])
def test_bad_image_tensors_are_400(client, inputs, message):
    response = infer(client, inputs)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:9/digit.png", "not a public address"),
    ("http://localhost/digit.png", "not a public address"),
    ("http://169.254.169.254/latest/meta-data", "not a public address"),
    ("http://10.0.0.1/digit.png", "not a public address"),
    ("http://[::1]/digit.png", "not a public address"),
    ("http://[::ffff:192.168.0.1]/x.png", "not a public address"),
    ("http://100.64.0.1/x.png", "not a public address"),  # shared address space (carrier NAT, some pod networks)
    ("http://[64:ff9b::a9fe:a9fe]/x.png", "not a public address"),  # NAT64 of the metadata endpoint
    ("http://user:pw@example.com/x.png", "credentials"),
    ("https://", "no host"),
])
def test_private_network_urls_are_refused(client, url, message):
    response = infer(client, [{"name": "input-0", "datatype": "BYTES", "shape": [1], "data": [url]}])
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str, bytes, dict]] = {}

    def do_GET(self) -> None:
        if self.path == "/drip.png":
            self._drip()
            return
        status, ctype, body, headers = self.routes.get(self.path, (404, "text/plain", b"missing", {}))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server stops oversized downloads
            self.wfile.write(body)

    def _drip(self) -> None:
        """An image sent one byte every 0.1 s: each read is quick, the whole takes a minute."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "600")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(600):
                self.wfile.write(b"\x00")
                self.wfile.flush()
                time.sleep(0.1)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_site(mnist_digits):
    """A real HTTP server on loopback serving digit images (and traps)."""
    images, labels = mnist_digits
    rng = np.random.default_rng(3)
    _ImageHandler.routes = {
        "/seven.jpg": (200, "image/jpeg", photo_of_digit(images[7], rng), {}),
        "/two.png": (200, "image/png", photo_of_digit(images[2], rng, fmt="PNG"), {}),
        "/page.html": (200, "text/html", b"<html>not an image</html>", {}),
        "/huge.png": (200, "image/png", b"\x89PNG" + b"\x00" * (11 * 1024 * 1024), {}),
        "/redirect-to-metadata": (302, "text/plain", b"", {"Location": "http://169.254.169.254/latest"}),
        "/redirect-to-seven": (302, "text/plain", b"", {"Location": "/seven.jpg"}),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", labels[7], labels[2]
    server.shutdown()


@pytest.fixture(scope="module")
def allowlisted_server(tmp_path_factory):
    """A server that may fetch from 127.0.0.1 (explicit allow-list), serving only the mnist package."""
    from tests.fixtures.server import TRAINED_MODELS

    tmp = tmp_path_factory.mktemp("allowlist")
    env = {"KCP_URL_ALLOWED_NETWORKS": "127.0.0.1/32", "KCP_URL_DEADLINE_S": "2"}
    with start_model_server(TRAINED_MODELS / "mnist", tmp, env=env) as s, s.client() as c:
        yield c


def test_url_inputs_are_fetched_when_allowed(allowlisted_server, image_site):
    base, seven, two = image_site
    urls = [f"{base}/seven.jpg", f"{base}/two.png", f"{base}/redirect-to-seven"]
    response = infer(allowlisted_server, [{"name": "input-0", "datatype": "BYTES", "shape": [3], "data": urls}])
    assert response.status_code == 200, response.text
    assert output(response.json(), "label").tolist() == [seven, two, seven]


@pytest.mark.parametrize("path, message", [
    ("/page.html", "content type 'text/html'"),
    ("/missing.png", "HTTP 404"),
    ("/huge.png", "limit"),
    ("/redirect-to-metadata", "not a public address"),
    ("/drip.png", "longer than the 2s limit"),
])
def test_bad_urls_are_400_even_when_allowed(allowlisted_server, image_site, path, message):
    base = image_site[0]
    response = infer(allowlisted_server, [{"name": "input-0", "datatype": "BYTES", "shape": [1],
                                           "data": [f"{base}{path}"]}])
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_loopback_is_refused_without_the_allow_list(client, image_site):
    response = infer(client, [{"name": "input-0", "datatype": "BYTES", "shape": [1],
                               "data": [f"{image_site[0]}/seven.jpg"]}])
    assert response.status_code == 400 and "not allowed" in response.json()["error"]


def test_base64_of_url_bytes_is_treated_as_image_bytes(client):
    data = base64.b64encode(b"http://example.com/x.png").decode()
    response = infer(client, [{"name": "input-0", "datatype": "BYTES", "shape": [1], "data": [data]}])
    assert response.status_code == 400 and "not a valid" in response.json()["error"]


@pytest.mark.parametrize("url", ["http://100.64.0.1/x.png", "http://169.254.169.254/latest/meta-data"])
def test_non_public_urls_are_invalid_argument_over_grpc(model_server, url):
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name="mnist", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input-0", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[url.encode()]))])
    with grpc.insecure_channel(model_server.grpc_target) as channel, pytest.raises(grpc.RpcError) as exc:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a public address" in exc.value.details()
