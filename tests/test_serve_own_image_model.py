"""A user's own Keras image classifier, colour and not square, from ``.keras`` to answers everywhere.

The test trains a small RGB model on synthetic pictures (which colour dominates), packages it with
``python -m predictors package``, and serves it over REST (encoded images and pixel tensors), gRPC, Kafka
and the browser page. The pictures sent are larger than the model's input, so the package's own
preprocessing (decode, rgb, resize to height × width, scale) is what makes them fit.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.server import REPO, start_model_server
from tests.support.v2 import raw_stub, split_bytes_tensor

pytestmark = pytest.mark.slow

HEIGHT, WIDTH = 12, 16
COLOURS = ["red", "green", "blue"]


def picture(colour: int, seed: int, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """A noisy RGB picture (height × width × 3, 0..255) in which channel ``colour`` dominates."""
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 110, (*size, 3))
    pixels[..., colour] += rng.uniform(110, 145)
    return pixels.clip(0, 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Path:
    """The trained model packaged by the CLI into a model directory of its own."""
    work = tmp_path_factory.mktemp("own-image-model")
    script = f"""
import numpy as np, keras
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
y = rng.integers(0, 3, 600)
x = rng.uniform(0, 110, (600, {HEIGHT}, {WIDTH}, 3))
x[np.arange(600), :, :, y] += rng.uniform(110, 145, (600, 1, 1)).reshape(600, 1, 1)
x = x.clip(0, 255) / 255.0
model = keras.Sequential([keras.Input(({HEIGHT}, {WIDTH}, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x, y, epochs=40, batch_size=32, verbose=0)
assert model.evaluate(x, y, verbose=0)[1] > 0.95
model.save("{work / 'colours.keras'}")
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=work, capture_output=True, timeout=300)
    done = subprocess.run([sys.executable, "-m", "predictors", "package", str(work / "colours.keras"), "--name",
                           "colours", "--out", str(work / "models" / "colours"), "--labels", *COLOURS],
                          check=True, capture_output=True, text=True, cwd=REPO)
    report = json.loads(done.stdout)
    assert report["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, HEIGHT, WIDTH, 3]}]
    return work / "models"


@pytest.fixture(scope="module")
def served(packaged, tmp_path_factory):
    with start_model_server(packaged, tmp_path_factory.mktemp("own-image-server")) as server:
        yield server


def label_names(answer: dict) -> list[str]:
    return next(o for o in answer["outputs"] if o["name"] == "label_name")["data"]


def test_encoded_colour_pictures_and_pixel_tensors_over_rest(served):
    pictures = [picture(c, seed) for seed, c in enumerate([0, 1, 2, 2, 0])]
    body = {"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [len(pictures)],
                        "data": [base64.b64encode(png(p)).decode() for p in pictures]}]}
    pixels = np.stack([np.asarray(Image.fromarray(p).resize((WIDTH, HEIGHT))) for p in pictures])
    tensor = {"inputs": [{"name": "input-0", "datatype": "UINT8", "shape": list(pixels.shape),
                          "data": pixels.ravel().tolist()}]}
    with served.client() as client:
        metadata = client.get("/v2/models/colours").json()
        assert metadata["inputs"][0]["shape"] == [-1, HEIGHT, WIDTH, 3]
        assert label_names(client.post("/v2/models/colours/infer", json=body).json()) == \
            ["red", "green", "blue", "blue", "red"]
        assert label_names(client.post("/v2/models/colours/infer", json=tensor).json()) == \
            ["red", "green", "blue", "blue", "red"]
        wrong = {"inputs": [{"name": "input-0", "datatype": "UINT8", "shape": [1, HEIGHT, WIDTH],
                             "data": [0] * (HEIGHT * WIDTH)}]}
        refused = client.post("/v2/models/colours/infer", json=wrong)
        assert refused.status_code == 400 and f"[N, {HEIGHT}, {WIDTH}, 3]" in refused.json()["error"]


def test_a_colour_picture_over_grpc(served):
    channel = grpc.insecure_channel(served.grpc_target)
    stub = raw_stub(channel)
    m = stub.messages
    request = m["ModelInferRequest"](model_name="colours", inputs=[m["ModelInferRequest"].InferInputTensor(
        name="input-0", datatype="BYTES", shape=[2],
        contents=m["InferTensorContents"](bytes_contents=[png(picture(1, 7)), png(picture(2, 8))]))])
    response = stub.ModelInfer(request)
    channel.close()
    index = [o.name for o in response.outputs].index("label_name")
    names = list(response.outputs[index].contents.bytes_contents) or \
        split_bytes_tensor(response.raw_output_contents[index])
    assert [n.decode() for n in names] == ["green", "blue"]


def test_a_colour_picture_through_kafka(served, kafka_broker, kafka_topics, bridges):
    from streaming.messenger import Messenger
    from tests.fixtures.broker import collect

    topics = kafka_topics(requests=1, results=1, dlq=1)
    bridges(topics, group="colours", grpc_target=served.grpc_target)
    with Messenger(topics["requests"], settings=kafka_broker.messenger_settings()) as messenger:
        messenger.send({"image_id": "pic-1", "model": "colours",
                        "image_b64": base64.b64encode(png(picture(2, 11))).decode()}, key="pic-1")
    results = collect(kafka_broker, topics["results"], until=lambda got: any(m.key_str == "pic-1" for m in got))
    answer = next(m.json() for m in results if m.key_str == "pic-1")
    assert label_names(answer) == ["blue"]


def test_the_browser_page_shows_the_colour_picture_the_model_saw(ui_page, served, tmp_path):
    from playwright.sync_api import expect

    path = tmp_path / "green.png"
    path.write_bytes(png(picture(1, 21, size=(90, 120))))
    page = ui_page.page
    page.goto(f"{served.http_url}/ui/#model=colours")
    expect(page.locator("#try-title")).to_contain_text("Try colours")
    page.get_by_label("Choose a PNG or JPEG image").set_input_files(path)
    expect(page.locator("#predicted-label")).to_have_text("green")
    expect(page.locator("#preview-caption")).to_contain_text(f"{WIDTH}×{HEIGHT} colour")
    size = page.eval_on_selector("#preview-canvas", "c => [c.width, c.height]")
    assert size == [WIDTH, HEIGHT]
    red, green, blue = page.eval_on_selector("#preview-canvas", """canvas => {
        const d = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        const sum = [0, 0, 0];
        for (let i = 0; i < d.length; i += 4) { sum[0] += d[i]; sum[1] += d[i + 1]; sum[2] += d[i + 2]; }
        return sum;
    }""")
    assert green > red and green > blue
    ui_page.shot("colour-preview")


def test_what_cannot_be_packaged_as_an_image_model_is_refused(tmp_path):
    script = f"""
import keras
model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
model.save("{tmp_path / 'regressor.keras'}")
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    result = subprocess.run([sys.executable, "-m", "predictors", "package", str(tmp_path / "regressor.keras"),
                             "--name", "bad", "--out", str(tmp_path / "bad")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "expected images" in result.stderr
