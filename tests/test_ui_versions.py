"""The browser page with a Katonic model and with model versions: real headless Chromium, real server.

The Katonic model's input is one BYTES tensor of JSON rows, which says nothing about what to type, so
the page builds its form from the row schema the card describes. Feedback given on the page is marked
as the page's, can be left out of the metrics there, and the versions of a model stand side by side.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from tests.fixtures.browser import UIPage
from tests.fixtures.server import TRAINED_MODELS, ServerHandle, start_model_server
from tests.support.v2 import output, tensor

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """Iris and the Katonic Iris, no API key."""
    tmp = tmp_path_factory.mktemp("ui-versions")
    for name in ("iris", "iris-katonic"):
        shutil.copytree(TRAINED_MODELS / name, tmp / "models" / name)
    with start_model_server(tmp / "models", tmp) as handle:
        yield handle


def test_the_card_describes_a_katonic_row(server: ServerHandle) -> None:
    with server.client() as c:
        card = c.get("/v2/models/iris-katonic/card").json()
        iris = c.get("/v2/models/iris/card").json()
    assert card["row_format"] == "json_object"
    assert [(f["name"], f["type"], f["required"]) for f in card["row_fields"]] == [
        ("sepal_length", "number", True), ("sepal_width", "number", True),
        ("petal_length", "number", True), ("petal_width", "number", True)]
    assert card["row_fields"][0]["exclusiveMinimum"] == 0
    assert iris["row_format"] == "tensor" and iris["row_fields"] is None


def test_the_katonic_form_classifies_and_its_feedback_is_marked_as_the_pages(
        ui_page: UIPage, server: ServerHandle) -> None:
    page = ui_page.page
    page.goto(f"{server.http_url}/ui/#model=iris-katonic")
    expect(page.locator("#try-title")).to_contain_text("Try iris-katonic")
    fields = page.locator("#tabular-fields input")
    expect(fields).to_have_count(4)
    ui_page.shot("katonic-form")

    # An empty field is explained before anything is sent.
    page.get_by_role("button", name="Classify", exact=True).click()
    expect(page.locator("#result-error")).to_contain_text("Enter a number for Sepal Length")

    for name, value in zip(("Sepal Length", "Sepal Width", "Petal Length", "Petal Width"), VIRGINICA, strict=True):
        page.get_by_label(name, exact=True).fill(str(value))
    page.get_by_role("button", name="Classify", exact=True).click()
    expect(page.locator("#predicted-label")).to_have_text("virginica")
    ui_page.shot("katonic-classified")

    page.get_by_role("button", name="Yes, this was right").click()
    expect(page.locator("#feedback-status")).to_contain_text("Thank you")
    expect(page.locator("#metric-count")).to_have_text("1")
    expect(page.locator('#versions tr[data-version="1"] td').first).to_have_text("1")

    # Production feedback from an API client, then the page's own left out.
    with server.client() as c:
        body = {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                            "data": [json.dumps(dict(zip(("sepal_length", "sepal_width", "petal_length",
                                                          "petal_width"), SETOSA, strict=True)))]}]}
        answer = c.post("/v2/models/iris-katonic/infer", json=body).json()
        pid = str(output(answer, "prediction_id")[0])
        assert c.post("/v2/models/iris-katonic/feedback",
                      json={"items": [{"id": pid, "true_label": 0}]}).status_code == 200
        assert c.get("/v2/models/iris-katonic/feedback", params={"source": "ui"}).json()["cumulative"]["count"] == 1
    expect(page.locator("#metric-count")).to_have_text("2", timeout=20_000)
    page.get_by_label("Leave out feedback given on this page").check()
    expect(page.locator("#metric-count")).to_have_text("1")
    ui_page.shot("production-only")


def test_versions_stand_side_by_side_after_a_swap(ui_page: UIPage, server: ServerHandle) -> None:
    model_dir = server.model_dir / "iris"
    with server.client() as c:
        def predict_and_confirm() -> None:
            answer = c.post("/v2/models/iris/infer", json={"inputs": [tensor("input-0", [SETOSA], "FP32")]}).json()
            pid = str(output(answer, "prediction_id")[0])
            assert c.post("/v2/models/iris/feedback", json={"items": [{"id": pid, "true_label": 1}]}).status_code == 200

        predict_and_confirm()
        config = json.loads((model_dir / "config.json").read_text())
        config["version"] = "2"
        (model_dir / "config.json").write_text(json.dumps(config))
        assert c.post("/v2/repository/models/iris/load").status_code == 200
        predict_and_confirm()
        predict_and_confirm()
    page = ui_page.page
    page.goto(f"{server.http_url}/ui/#model=iris")
    expect(page.locator("#try-title")).to_contain_text("version 2")
    rows = page.locator("#versions tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator("th")).to_have_text("1")
    expect(rows.nth(1).locator("th")).to_have_text("2")
    expect(rows.nth(1).locator("td").first).to_have_text("2")
    ui_page.shot("versions")
