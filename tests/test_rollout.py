"""Roll out a new model version and let feedback decide: two versions served one after the other by a real
server (a hot swap through the repository API), ground truth sent by prediction id, and the comparison
report's verdict, over REST and through the CLI.

Version 2 is seeded to be truly worse: a LogisticRegression of the same kind, fitted on the Iris data with
every feature but sepal width blanked, so it answers from one weak feature. On all 150 flowers the
difference is far past chance ("worse"); on six flowers chosen so that the gap is small in counts it is
not ("undecided", with the n a test would need).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from predictors.feedback.cli import EXIT_WORSE
from tests.fixtures.server import REPO, TRAINED_MODELS, start_model_server
from tests.support.v2 import output, tensor

X, Y = load_iris(return_X_y=True)


def worse_estimator() -> LogisticRegression:
    """Same estimator type and shape as version 1 (4 features, 3 classes), but it sees sepal width only."""
    blanked = X.copy()
    blanked[:, [0, 2, 3]] = 0.0
    return LogisticRegression(C=10.0, random_state=0, solver="newton-cg").fit(blanked, Y)


def package(model_dir: Path, name: str) -> Path:
    """A copy of the trained iris package named ``name`` at version 1."""
    target = model_dir / name
    shutil.copytree(TRAINED_MODELS / "iris", target)
    config = json.loads((target / "config.json").read_text())
    config.update(name=name, version="1")
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def swap_to_version_2(client: httpx.Client, directory: Path, estimator: LogisticRegression) -> None:
    """Write version 2 into the package directory and hot-swap it in through the repository API."""
    joblib.dump(estimator, directory / "model.joblib")
    config = json.loads((directory / "config.json").read_text())
    config["version"] = "2"
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    name = config["name"]
    r = client.post(f"/v2/repository/models/{name}/load")
    assert r.status_code == 200, r.text
    assert client.get(f"/v2/models/{name}").json()["versions"] == ["2"]


def serve_and_judge(client: httpx.Client, model: str, rows: np.ndarray, truth: np.ndarray, version: str) -> None:
    """Predict ``rows``, check the answer names ``version``, and send the truth for each prediction by id."""
    for start in range(0, len(rows), 50):
        chunk = rows[start:start + 50]
        r = client.post(f"/v2/models/{model}/infer",
                        json={"inputs": [tensor("input-0", chunk.tolist(), "FP32")]})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == version
        ids = [str(i) for i in output(r.json(), "prediction_id")]
        items = [{"id": i, "true_label": int(t)} for i, t in zip(ids, truth[start:start + 50], strict=True)]
        fb = client.post(f"/v2/models/{model}/feedback", json={"items": items})
        assert fb.status_code == 200, fb.text


def cli(server_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "predictors.feedback", *args, "--url", server_url],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory):
    """One server with two models rolled from version 1 to 2: ``iris-big`` on 150 flowers per version and
    ``iris-small`` on 6. Yields (server, report of the comparison for each)."""
    tmp = tmp_path_factory.mktemp("rollout")
    model_dir = tmp / "models"
    big, small = package(model_dir, "iris-big"), package(model_dir, "iris-small")
    v1 = joblib.load(TRAINED_MODELS / "iris" / "model.joblib")
    v2 = worse_estimator()
    # Six flowers both versions would be asked about: v1 right on all, v2 right on four, wrong on two.
    right1 = v1.predict(X) == Y
    right2 = v2.predict(X) == Y
    few = np.concatenate([np.flatnonzero(right1 & right2)[:4], np.flatnonzero(right1 & ~right2)[:2]])
    with start_model_server(model_dir, tmp) as server, server.client() as c:
        serve_and_judge(c, "iris-big", X, Y, "1")
        serve_and_judge(c, "iris-small", X[few], Y[few], "1")
        swap_to_version_2(c, big, v2)
        swap_to_version_2(c, small, v2)
        serve_and_judge(c, "iris-big", X, Y, "2")
        serve_and_judge(c, "iris-small", X[few], Y[few], "2")
        yield server, {"v1_accuracy": float(right1.mean()), "v2_accuracy": float(right2.mean())}


def test_a_truly_worse_version_is_judged_worse(rollout) -> None:
    server, truth = rollout
    assert truth["v1_accuracy"] > 0.9 > 0.7 > truth["v2_accuracy"]  # the seeding did what it says
    with server.client() as c:
        r = c.get("/v2/models/iris-big/feedback/compare")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["verdict"] == "worse", body["reason"]
    assert (body["baseline"]["version"], body["candidate"]["version"]) == ("1", "2")
    assert body["baseline"]["count"] == body["candidate"]["count"] == body["n_so_far"] == 150
    assert body["baseline"]["accuracy"] == pytest.approx(truth["v1_accuracy"])
    assert body["candidate"]["accuracy"] == pytest.approx(truth["v2_accuracy"])
    for side in (body["baseline"], body["candidate"]):
        acc, f1 = side["accuracy_interval"], side["macro_f1_interval"]
        assert acc["method"] == "wilson" and acc["low"] < side["accuracy"] < acc["high"]
        assert f1["low"] <= side["macro_f1"] <= f1["high"]
    assert body["candidate"]["accuracy_interval"]["high"] < body["baseline"]["accuracy_interval"]["low"]
    assert body["test"]["p_value"] < 0.05 and body["test"]["difference"] < 0
    assert [v["version"] for v in body["versions"]] == ["1", "2"]


def test_a_small_sample_is_undecided_with_the_n_it_needs(rollout) -> None:
    server, _ = rollout
    with server.client() as c:
        body = c.get("/v2/models/iris-small/feedback/compare").json()
    assert body["verdict"] == "undecided", body
    assert body["baseline"]["accuracy"] == 1.0 and body["candidate"]["accuracy"] == pytest.approx(4 / 6)
    assert body["n_so_far"] == 6
    assert body["n_needed"] is not None and body["n_needed"] > body["n_so_far"]
    assert body["test"]["p_value"] >= 0.05


def test_the_report_shows_versions_side_by_side_and_filters_by_version(rollout) -> None:
    server, truth = rollout
    with server.client() as c:
        everything = c.get("/v2/models/iris-big/feedback").json()
        only_2 = c.get("/v2/models/iris-big/feedback", params={"version": "2"}).json()
        none = c.get("/v2/models/iris-big/feedback", params={"version": "3"}).json()
    assert [(v["version"], v["count"]) for v in everything["versions"]] == [("1", 150), ("2", 150)]
    assert everything["cumulative"]["count"] == 300 and everything["version"] is None
    assert only_2["version"] == "2" and only_2["cumulative"]["count"] == 150
    assert only_2["cumulative"]["accuracy"] == pytest.approx(truth["v2_accuracy"])
    assert none["cumulative"]["count"] == 0 and none["cumulative"]["accuracy"] is None


def test_the_version_is_a_label_on_the_feedback_metrics(rollout) -> None:
    server, truth = rollout
    with server.client() as c:
        text = c.get("/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples
               if s.labels.get("model") == "iris-big"]
    accuracy = {s.labels["version"]: s.value for s in samples if s.name == "classifier_feedback_accuracy"}
    assert accuracy == pytest.approx({"1": truth["v1_accuracy"], "2": truth["v2_accuracy"]})
    cells = [s for s in samples if s.name == "classifier_feedback_total"]
    assert {s.labels["version"] for s in cells} == {"1", "2"} and {s.labels["source"] for s in cells} == {"api"}
    assert sum(s.value for s in cells if s.labels["version"] == "2") == 150


def test_the_cli_prints_the_verdict_and_the_versions(rollout) -> None:
    server, _ = rollout
    worse = cli(server.http_url, "compare", "--model", "iris-big", "--fail-if-worse")
    assert worse.returncode == EXIT_WORSE, worse.stderr
    assert "verdict: worse" in worse.stdout
    small = cli(server.http_url, "compare", "--model", "iris-small")
    assert small.returncode == 0, small.stderr
    assert "verdict: undecided" in small.stdout and "n so far: 6" in small.stdout
    report = cli(server.http_url, "report", "--model", "iris-big")
    assert report.returncode == 0, report.stderr
    table = report.stdout.split("versions side by side:")[1].splitlines()
    assert table[1].split()[0] == "version" and [line.split()[0] for line in table[2:4]] == ["1", "2"]


def test_the_readme_rollout_commands_give_the_verdicts(rollout, tmp_path) -> None:
    """The README's "Roll out a new model version" block: its compare command, against the rolled-out models."""
    server, _ = rollout
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Roll out a new model version", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    compare = next(line for line in block.splitlines() if "feedback compare" in line)
    args = compare.replace("python -m predictors.feedback ", "").replace("http://localhost:8080", server.http_url)
    worse = subprocess.run([sys.executable, "-m", "predictors.feedback", *args.replace("--model iris ",
                            "--model iris-big ").split()], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert worse.returncode == EXIT_WORSE and "verdict: worse" in worse.stdout, worse.stdout + worse.stderr
    small = subprocess.run([sys.executable, "-m", "predictors.feedback", *args.replace("--model iris ",
                            "--model iris-small ").split()], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert small.returncode == 0 and "verdict: undecided" in small.stdout, small.stdout + small.stderr
