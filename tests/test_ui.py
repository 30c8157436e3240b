"""The browser page end to end: real headless Chromium against the real model server on loopback.

Each test drives the page the way a person would (file chooser, mouse strokes on the canvas,
the feedback buttons, the API-key field, the keyboard) and checks what the page shows against
what the API itself answers. Screenshots of every step are saved under test-artifacts/ui/.
The ``ui_page`` fixture also fails any test whose page tried to reach a host other than
loopback, or threw an uncaught JavaScript error.
"""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from playwright.sync_api import Page, expect

from tests.fixtures.browser import UIPage
from tests.fixtures.digits import photo_of_digit
from tests.fixtures.server import TRAINED_MODELS, ServerHandle, start_model_server
from tests.support.v2 import bytes_tensor, output

KEY = "browser-test-key"
SETOSA = [5.1, 3.5, 1.4, 0.2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """Iris only (quick to start) behind an API key."""
    tmp = tmp_path_factory.mktemp("ui-browser-keyed")
    shutil.copytree(TRAINED_MODELS / "iris", tmp / "models" / "iris")
    with start_model_server(tmp / "models", tmp, api_key=KEY) as server:
        yield server


def open_model(ui: UIPage, server: ServerHandle, model: str) -> Page:
    """Load the page with ``model`` selected and wait until its panel and metrics are up."""
    page = ui.page
    page.goto(f"{server.http_url}/ui/#model={model}")
    expect(page.locator("#try-title")).to_contain_text(f"Try {model}")
    return page


def digit_photo(mnist_digits: tuple[np.ndarray, np.ndarray], index: int, tmp_path: Path) -> tuple[Path, int]:
    """A real held-out MNIST digit as dark ink on white paper, 400x300, off-centre: a PNG file."""
    images, labels = mnist_digits
    path = tmp_path / f"digit-{index}-a-{int(labels[index])}.png"
    path.write_bytes(photo_of_digit(images[index], np.random.default_rng(index), fmt="PNG"))
    return path, int(labels[index])


def image_body(data: bytes) -> dict:
    return {"inputs": [bytes_tensor("input-0", [data])]}


def drop_file(page: Page, path: Path) -> None:
    """Drag and drop ``path`` onto the drop zone, as the browser does for a file dragged from the desktop."""
    page.eval_on_selector("#drop-zone", """(zone, [name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }""", [path.name, base64.b64encode(path.read_bytes()).decode()])


def canvas_pixels(page: Page, selector: str) -> np.ndarray:
    """The red channel of a canvas as a 2-D array, read back from the page."""
    width, height, values = page.eval_on_selector(selector, """canvas => {
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        const red = [];
        for (let i = 0; i < data.length; i += 4) red.push(data[i]);
        return [canvas.width, canvas.height, red];
    }""")
    return np.asarray(values, dtype=np.float64).reshape(height, width)


def centre_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(pixels.shape)
    return float((ys * pixels).sum() / pixels.sum()), float((xs * pixels).sum() / pixels.sum())


def api_message(response: httpx.Response) -> re.Pattern[str]:
    """The API's error text as a pattern; object addresses (``at 0x7f...``) differ from call to call."""
    parts = re.split(r"0x[0-9a-f]+", response.json()["error"])
    return re.compile("0x[0-9a-f]+".join(re.escape(part) for part in parts))


def confusion_cell(page: Page, true: int, predicted: int):
    return page.locator(f'#confusion td[data-true="{true}"][data-predicted="{predicted}"]')


# --- image models -----------------------------------------------------------------------------


def test_upload_a_photo_of_a_digit_shows_the_right_label_and_what_the_model_saw(
        ui_page: UIPage, model_server: ServerHandle, mnist_digits, tmp_path: Path) -> None:
    path, label = digit_photo(mnist_digits, 3, tmp_path)
    page = open_model(ui_page, model_server, "mnist")
    ui_page.shot("mnist-selected")

    page.get_by_label("Choose a PNG or JPEG image").set_input_files(path)

    expect(page.locator("#predicted-label")).to_have_text(str(label))
    expect(page.locator("#result-status")).to_contain_text(f"Predicted {label}")
    expect(page.locator("#original-figure")).to_be_visible()
    expect(page.locator("#preview-figure")).to_be_visible()
    bars = page.locator("#topk li")
    expect(bars.first).to_have_attribute("data-label", str(label))
    top_k = httpx.get(f"{model_server.http_url}/v2/models/mnist/card").json()["top_k"]
    expect(bars).to_have_count(top_k)
    ui_page.shot("predicted")

    # The preview is the model's real input: the server's own preprocessing of the same bytes.
    answer = httpx.post(f"{model_server.http_url}/v2/models/mnist/preprocess", json=image_body(path.read_bytes()))
    expected = np.asarray(answer.json()["outputs"][0]["data"]).reshape(28, 28) * 255
    shown = canvas_pixels(page, "#preview-canvas")
    assert shown.shape == (28, 28)
    assert np.abs(shown - expected).max() <= 1.0


def test_draw_a_digit_with_the_mouse_and_get_a_prediction(ui_page: UIPage, model_server: ServerHandle) -> None:
    page = open_model(ui_page, model_server, "mnist")
    page.get_by_role("tab", name="Draw").click()
    canvas = page.locator("#draw-canvas")
    expect(canvas).to_be_visible()
    box = canvas.bounding_box()
    assert box is not None
    # A "1" drawn well left of centre, as a person would: press, drag down, release.
    x = box["x"] + box["width"] * 0.3
    page.mouse.move(x, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    page.mouse.move(x + 4, box["y"] + box["height"] * 0.5, steps=12)
    page.mouse.move(x + 6, box["y"] + box["height"] * 0.85, steps=12)
    page.mouse.up()
    drawn = 255 - canvas_pixels(page, "#draw-canvas")  # ink = dark on the white canvas
    assert drawn.sum() > 0
    assert centre_of_mass(drawn)[1] < drawn.shape[1] * 0.4
    ui_page.shot("drawn")

    page.get_by_role("button", name="Classify drawing").click()

    expect(page.locator("#predicted-label")).to_have_text(re.compile(r"^[0-9]$"))
    expect(page.locator("#preview-figure")).to_be_visible()
    seen = canvas_pixels(page, "#preview-canvas")
    assert seen.max() > 200, "the preview shows the stroke as light ink"
    cy, cx = centre_of_mass(seen)
    assert abs(cy - 13.5) < 2 and abs(cx - 13.5) < 2, "the server centred the off-centre drawing"
    ui_page.shot("predicted")


def test_feedback_changes_the_confusion_matrix_live(
        ui_page: UIPage, model_server: ServerHandle, mnist_digits, tmp_path: Path) -> None:
    page = open_model(ui_page, model_server, "mnist")
    path, _ = digit_photo(mnist_digits, 5, tmp_path)
    page.get_by_label("Choose a PNG or JPEG image").set_input_files(path)
    expect(page.locator("#predicted-label")).to_have_text(re.compile(r"^[0-9]$"))
    predicted = int(page.locator("#predicted-label").inner_text())
    right = confusion_cell(page, predicted, predicted)
    expect(right).to_be_visible()
    before = int(right.inner_text())
    count_before = int(page.locator("#metric-count").inner_text())

    page.get_by_role("button", name="Yes, this was right").click()

    expect(page.locator("#feedback-status")).to_contain_text("Thank you")
    expect(right).to_have_text(str(before + 1))
    expect(page.locator("#metric-count")).to_have_text(str(count_before + 1))
    expect(page.get_by_role("button", name="Yes, this was right")).to_be_disabled()  # one answer per prediction
    ui_page.shot("confirmed")

    # A correction lands off the diagonal: true label chosen in the form, predicted by the model.
    # (This digit arrives by drag and drop.)
    first_id = page.locator("#prediction-id").inner_text()
    path, _ = digit_photo(mnist_digits, 6, tmp_path)
    drop_file(page, path)
    expect(page.locator("#prediction-id")).not_to_have_text(first_id)
    expect(page.get_by_role("button", name="Yes, this was right")).to_be_enabled()
    predicted = int(page.locator("#predicted-label").inner_text())
    true = (predicted + 1) % 10
    wrong = confusion_cell(page, true, predicted)
    before = int(wrong.inner_text())
    page.get_by_label("No, the true label was").select_option(str(true))
    page.get_by_role("button", name="Send correction").click()
    expect(page.locator("#feedback-status")).to_contain_text("Thank you")
    expect(wrong).to_have_text(str(before + 1))
    ui_page.shot("corrected")

    # Feedback from another client shows up by polling, without reloading the page.
    with model_server.client() as api:
        image = path.read_bytes()
        response = api.post("/v2/models/mnist/infer", json=image_body(image)).json()
        other = int(output(response, "label")[0])
        prediction_id = str(output(response, "prediction_id")[0])
        cell = confusion_cell(page, other, other)
        before = int(cell.inner_text())
        sent = api.post("/v2/models/mnist/feedback", json={"items": [{"id": prediction_id, "true_label": other}]})
        assert sent.status_code == 200, sent.text
    expect(cell).to_have_text(str(before + 1), timeout=20_000)
    ui_page.shot("refreshed-live")


def test_a_file_that_is_not_an_image_shows_the_api_error(ui_page: UIPage, model_server: ServerHandle) -> None:
    junk = b"name,value\nthis is a CSV file,1\n"
    expected = httpx.post(f"{model_server.http_url}/v2/models/mnist/infer", json=image_body(junk))
    assert expected.status_code == 400
    page = open_model(ui_page, model_server, "mnist")

    page.get_by_label("Choose a PNG or JPEG image").set_input_files(
        files=[{"name": "notes.png", "mimeType": "image/png", "buffer": junk}])

    error = page.locator("#result-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(api_message(expected))
    expect(error).to_contain_text("HTTP 400")
    expect(page.locator("#result-body")).to_be_hidden()
    ui_page.shot("not-an-image")

    # A URL the server's network guard refuses: the guard's own reason reaches the page.
    url = "http://169.254.169.254/latest/meta-data.png"
    refused = httpx.post(f"{model_server.http_url}/v2/models/mnist/infer",
                         json={"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [url]}]})
    assert 400 <= refused.status_code < 500
    page.get_by_role("tab", name="Image URL").click()
    page.get_by_role("textbox", name="Image URL").fill(url)
    page.get_by_role("button", name="Classify URL").click()
    expect(error).to_contain_text(api_message(refused))
    ui_page.shot("url-refused")


# --- API key ----------------------------------------------------------------------------------


def test_with_auth_on_the_page_asks_for_the_key_then_works(ui_page: UIPage, keyed: ServerHandle) -> None:
    page = ui_page.page
    page.goto(f"{keyed.http_url}/ui/")
    notice = page.locator("#notice")
    expect(notice).to_contain_text("needs an API key")
    expect(page.locator("#models-status")).to_contain_text("missing or invalid API key")
    expect(page.get_by_label("API key")).to_be_focused()
    ui_page.shot("asks-for-key")

    page.get_by_label("API key").fill("not-the-key")
    page.get_by_role("button", name="Use key").click()
    expect(notice).to_contain_text("refused the API key")
    ui_page.shot("wrong-key")

    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    expect(notice).to_be_hidden()
    expect(page.locator('#models-table tr[data-model="iris"] .status')).to_have_text("Ready")
    expect(page.locator("#try-title")).to_contain_text("Try iris")
    card = httpx.get(f"{keyed.http_url}/v2/models/iris/card", headers={"X-API-Key": KEY}).json()
    for name, value in zip(card["feature_names"], SETOSA, strict=True):
        page.get_by_label(name, exact=True).fill(str(value))
    page.get_by_role("button", name="Classify", exact=True).click()
    expect(page.locator("#predicted-label")).to_have_text(card["labels"][0]["name"])
    expect(page.locator("#metrics-body")).to_be_visible()
    ui_page.shot("works-with-key")

    # The key lives in this tab's sessionStorage only, and survives a reload of the tab.
    assert page.evaluate("sessionStorage.getItem('kcp-ui-api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0
    assert KEY not in page.url
    page.reload()
    expect(page.locator("#try-title")).to_contain_text("Try iris")
    expect(notice).to_be_hidden()


# --- small screens and keyboard ---------------------------------------------------------------


def test_phone_sized_screen_and_keyboard_only_use(ui_page: UIPage, model_server: ServerHandle) -> None:
    page = ui_page.page
    page.set_viewport_size({"width": 390, "height": 844})
    open_model(ui_page, model_server, "iris")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "no sideways scrolling"

    fields = page.locator("#tabular-fields input")
    expect(fields).to_have_count(4)
    fields.first.focus()
    for i, value in enumerate(SETOSA):
        page.keyboard.type(str(value))
        page.keyboard.press("Enter" if i == len(SETOSA) - 1 else "Tab")
    expect(page.locator("#result-status")).to_contain_text("Predicted")
    expect(page.locator("#result-status")).to_have_attribute("aria-live", "polite")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    ui_page.shot("phone-iris")

    page.get_by_role("button", name="Try mnist").click()
    expect(page.locator("#try-title")).to_be_focused()
    upload = page.get_by_role("tab", name="Upload")
    upload.focus()
    page.keyboard.press("ArrowRight")
    url_tab = page.get_by_role("tab", name="Image URL")
    expect(url_tab).to_be_focused()
    expect(url_tab).to_have_attribute("aria-selected", "true")
    expect(page.get_by_role("textbox", name="Image URL")).to_be_visible()
    page.keyboard.press("End")
    expect(page.get_by_role("tab", name="Draw")).to_be_focused()
    expect(page.locator("#draw-canvas")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    ui_page.shot("phone-mnist-draw")


def test_empty_form_field_is_explained_before_anything_is_sent(ui_page: UIPage, model_server: ServerHandle) -> None:
    page = open_model(ui_page, model_server, "iris")
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url) if request.url.endswith("/infer") else None)
    page.get_by_role("button", name="Classify", exact=True).click()
    expect(page.locator("#result-error")).to_contain_text("Enter a number for")
    expect(page.locator("#tabular-fields input").first).to_be_focused()
    assert sent == []
