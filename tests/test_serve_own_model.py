"""A user's own scikit-learn model, from a fitted estimator to answers over REST and gRPC.

The first test runs the README's "Serve your own model" commands as written (ports and the bind address
aside) on a pipeline this test fits itself; the others check what that path promises: column inputs with
string categories over both protocols, the compiled runtime in the metadata, a model that cannot be
compiled served by scikit-learn with the reason, and clear errors for what cannot be packaged.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from tests.fixtures.ports import free_port
from tests.fixtures.server import REPO, start_model_server
from tests.support.v2 import raw_stub, split_bytes_tensor

pytestmark = pytest.mark.slow


def customers(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.integers(18, 80, n), "income": rng.normal(50, 15, n).round(2),
                         "city": rng.choice(["paris", "rome", "oslo"], n), "plan": rng.choice(["basic", "pro"], n)})


@pytest.fixture(scope="module")
def churn(tmp_path_factory) -> tuple[Path, Pipeline, pd.DataFrame]:
    """A directory holding churn.joblib (a ColumnTransformer + forest fitted on a data frame) and customers.csv."""
    work = tmp_path_factory.mktemp("own-model")
    frame = customers()
    target = np.where((frame.age > 40) & (frame.city != "rome"), "churn", "stay")
    estimator = Pipeline([
        ("columns", ColumnTransformer([("num", StandardScaler(), ["age", "income"]),
                                       ("cat", OneHotEncoder(handle_unknown="ignore"), ["city", "plan"])])),
        ("forest", RandomForestClassifier(60, random_state=0))]).fit(frame, target)
    joblib.dump(estimator, work / "churn.joblib")
    frame.to_csv(work / "customers.csv", index=False)
    return work, estimator, frame


def readme_commands() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Serve your own model", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def json_documents(text: str) -> list[dict]:
    """Every JSON object in ``text``, which the commands print one after another (curl adds no newline)."""
    decoder, documents, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        document, i = decoder.raw_decode(text, i)
        documents.append(document)
    return documents


def test_the_readme_path_serves_a_model_the_user_fitted(churn):
    work, estimator, _ = churn
    http_port, grpc_port = free_port(), free_port()
    script = (readme_commands().replace("localhost:8080", f"127.0.0.1:{http_port}")
              .replace("--http_port 8080 --grpc_port 8081", f"--http_port {http_port} --grpc_port {grpc_port} "
                                                            f"--host 127.0.0.1"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OPENBLAS_NUM_THREADS": "1",
           "KCP_FEEDBACK_DB_URL": f"sqlite:///{work / 'feedback.db'}", "KCP_EXECUTION_CACHE": ""}
    env.pop("KCP_API_KEY", None)
    # The server the script starts in the background keeps its output open: read files, not pipes.
    with open(work / "out.txt", "w") as out_file, open(work / "err.txt", "w") as err_file:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, stdout=out_file,
                                stderr=err_file, start_new_session=True)
        try:
            proc.wait(timeout=240)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
    out, err = (work / "out.txt").read_text(), (work / "err.txt").read_text()
    assert proc.returncode == 0, err[-3000:]
    documents = json_documents(out)
    packaged = next(d for d in documents if "runtime_reason" in d)
    assert packaged["runtime"] == "onnxruntime", packaged["runtime_reason"]
    assert [i["name"] for i in packaged["inputs"]] == ["age", "income", "city", "plan"]
    validated = next(d for d in documents if d.get("package") == "models/churn")
    assert validated["ok"] is True
    metadata = next(d for d in documents if "platform" in d)
    assert metadata["properties"]["runtime"] == "onnxruntime"
    assert metadata["properties"]["execution"] in ("inline", "thread_pool")
    answer = next(d for d in documents if "model_name" in d)
    names = next(o for o in answer["outputs"] if o["name"] == "label_name")["data"]
    rows = pd.DataFrame({"age": [52, 23], "income": [61.5, 30.0], "city": ["paris", "rome"], "plan": ["pro", "basic"]})
    assert names == list(estimator.predict(rows))


@pytest.fixture(scope="module")
def served(churn, tmp_path_factory):
    """The churn package and one that cannot be compiled, served by one server."""
    work, _, _ = churn
    models = tmp_path_factory.mktemp("own-models")
    run = [sys.executable, "-m", "predictors", "package"]
    subprocess.run([*run, str(work / "churn.joblib"), "--name", "churn", "--out", str(models / "churn"),
                    "--data", str(work / "customers.csv")], check=True, capture_output=True, cwd=REPO)
    x = np.random.default_rng(1).normal(size=(200, 3))
    custom = Pipeline([("square", FunctionTransformer(np.square)), ("clf", LogisticRegression())])
    joblib.dump(custom.fit(x, (x[:, 0] ** 2 > 1).astype(int)), work / "custom.joblib")
    subprocess.run([*run, str(work / "custom.joblib"), "--name", "custom", "--out", str(models / "custom"),
                    "--labels", "small", "large"], check=True, capture_output=True, cwd=REPO)
    x, y = load_iris(return_X_y=True, as_frame=True)
    joblib.dump(KNeighborsClassifier(5).fit(x.to_numpy(), y), work / "neighbours.joblib")
    x.to_csv(work / "iris.csv", index=False)
    subprocess.run([*run, str(work / "neighbours.joblib"), "--name", "neighbours", "--out",
                    str(models / "neighbours"), "--data", str(work / "iris.csv")], check=True, capture_output=True,
                   cwd=REPO)
    with start_model_server(models, tmp_path_factory.mktemp("own-server"),
                            env={"KCP_EXECUTION_CACHE": ""}) as server:
        yield server


def test_a_model_that_cannot_compile_is_served_by_scikit_learn_with_the_reason(served):
    with served.client() as client:
        props = client.get("/v2/models/custom").json()["properties"]
        assert props["runtime"] == "sklearn"
        assert "FunctionTransformer" in props["runtime_reason"]
        body = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [2, 3], "data": [2, 0, 0, 0.1, 0, 0]}]}
        answer = client.post("/v2/models/custom/infer", json=body).json()
    assert next(o for o in answer["outputs"] if o["name"] == "label_name")["data"] == ["large", "small"]


def test_columns_with_string_categories_over_grpc(served, churn):
    _, estimator, frame = churn
    rows = frame.head(5)
    channel = grpc.insecure_channel(served.grpc_target)
    stub = raw_stub(channel)
    m = stub.messages
    tensor = m["ModelInferRequest"].InferInputTensor
    contents = m["InferTensorContents"]
    request = m["ModelInferRequest"](model_name="churn", inputs=[
        tensor(name="age", datatype="INT64", shape=[5], contents=contents(int64_contents=rows.age.tolist())),
        tensor(name="income", datatype="FP64", shape=[5], contents=contents(fp64_contents=rows.income.tolist())),
        *(tensor(name=column, datatype="BYTES", shape=[5],
                 contents=contents(bytes_contents=[v.encode() for v in rows[column]])) for column in ("city", "plan")),
    ])
    response = stub.ModelInfer(request)
    channel.close()
    by_name = {o.name: o for o in response.outputs}
    names = list(by_name["label_name"].contents.bytes_contents)
    if not names:  # raw output contents
        index = [o.name for o in response.outputs].index("label_name")
        names = split_bytes_tensor(response.raw_output_contents[index])
    assert [n.decode() for n in names] == list(estimator.predict(rows))


@pytest.mark.parametrize("inputs, message", [
    ([{"name": "age", "datatype": "INT64", "shape": [1], "data": [52]}], "missing inputs"),
    ([{"name": "age", "datatype": "BYTES", "shape": [1], "data": ["old"]},
      {"name": "income", "datatype": "FP64", "shape": [1], "data": [1.0]},
      {"name": "city", "datatype": "BYTES", "shape": [1], "data": ["rome"]},
      {"name": "plan", "datatype": "BYTES", "shape": [1], "data": ["pro"]}], "numeric"),
    ([{"name": "age", "datatype": "INT64", "shape": [2], "data": [52, 3]},
      {"name": "income", "datatype": "FP64", "shape": [1], "data": [1.0]},
      {"name": "city", "datatype": "BYTES", "shape": [1], "data": ["rome"]},
      {"name": "plan", "datatype": "BYTES", "shape": [1], "data": ["pro"]}], "same number of rows"),
    ([{"name": "age", "datatype": "INT64", "shape": [1], "data": [52]},
      {"name": "income", "datatype": "FP64", "shape": [1], "data": [1.0]},
      {"name": "city", "datatype": "INT64", "shape": [1], "data": [3]},
      {"name": "plan", "datatype": "BYTES", "shape": [1], "data": ["pro"]}], "must be BYTES"),
])
def test_bad_columns_are_a_clear_400(served, inputs, message):
    with served.client() as client:
        response = client.post("/v2/models/churn/infer", json={"inputs": inputs})
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]
        assert client.get("/v2/models/churn/ready").status_code == 200


@pytest.mark.parametrize("estimator, message", [
    (LinearRegression(), "regressor"),
    (Pipeline([("clf", LogisticRegression())]), "not fitted"),
])
def test_what_cannot_be_packaged_is_refused_with_the_reason(tmp_path, estimator, message):
    x = np.random.default_rng(0).normal(size=(50, 2))
    if message != "not fitted":
        estimator.fit(x, x[:, 0])
    joblib.dump(estimator, tmp_path / "model.joblib")
    result = subprocess.run([sys.executable, "-m", "predictors", "package", str(tmp_path / "model.joblib"), "--name",
                             "bad", "--out", str(tmp_path / "bad")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "bad").exists()


def test_the_package_without_data_is_checked_on_synthesised_rows(tmp_path):
    x = np.random.default_rng(0).normal(size=(200, 5))
    estimator = RandomForestClassifier(20, random_state=0).fit(x, (x[:, 0] > 0).astype(int))
    joblib.dump(estimator, tmp_path / "forest.joblib")
    result = subprocess.run([sys.executable, "-m", "predictors", "package", str(tmp_path / "forest.joblib"),
                             "--name", "forest", "--out", str(tmp_path / "forest")],
                            capture_output=True, text=True, cwd=REPO, check=True)
    report = json.loads(result.stdout)
    assert report["runtime"] == "onnxruntime" and "synthesised" in report["probes"]
    assert report["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, 5]}]


def test_the_browser_page_offers_one_field_per_column(ui_page, served, churn):
    """The page's form for a data-frame model: numbers where the column is numeric, the learned categories
    to choose from where it is a string; the answer is the estimator's."""
    from playwright.sync_api import expect

    _, estimator, _ = churn
    page = ui_page.page
    page.goto(f"{served.http_url}/ui/#model=churn")
    expect(page.locator("#try-title")).to_contain_text("Try churn")
    page.get_by_label("age", exact=True).fill("61")
    page.get_by_label("income", exact=True).fill("72.5")
    expect(page.get_by_label("city", exact=True).locator("option")).to_have_count(3)
    page.get_by_label("city", exact=True).select_option("oslo")
    page.get_by_label("plan", exact=True).select_option("pro")
    ui_page.shot("column-form")
    page.get_by_role("button", name="Classify", exact=True).click()
    row = pd.DataFrame({"age": [61], "income": [72.5], "city": ["oslo"], "plan": ["pro"]})
    expect(page.locator("#predicted-label")).to_have_text(str(estimator.predict(row)[0]))
    page.get_by_label("age", exact=True).fill("6.5")
    page.get_by_role("button", name="Classify", exact=True).click()
    expect(page.locator("#result-error")).to_contain_text("whole number for age")


def test_both_protocols_publish_how_the_model_is_served(served):
    """The metadata's properties (runtime, execution, row limit) over REST, and over gRPC in the protocol's own
    ``properties`` map, which the bridge reads to cap merged calls."""
    with served.client() as client:
        rest = client.get("/v2/models/churn").json()["properties"]
    channel = grpc.insecure_channel(served.grpc_target)
    stub = raw_stub(channel)
    reply = stub.ModelMetadata(stub.messages["ModelMetadataRequest"](name="churn"))
    channel.close()
    assert dict(reply.properties) == rest
    assert rest["max_batch_size"] == "256" and rest["runtime"] == "onnxruntime"
    assert rest["batching"] == "off" and rest["batching_basis"] == "column inputs are not merged into one call"


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_model_that_is_mostly_per_call_overhead_batches_concurrent_requests(served, protocol):
    """k-nearest neighbours served by scikit-learn (Iris's repeated rows tie, so it is not compiled): a merged
    row costs a fraction of a call of its own, so timing at load turned the batcher on. Sixteen concurrent
    clients get exactly the estimator's answers for their own rows, and the batcher took their calls."""
    with served.client() as client:
        props = client.get("/v2/models/neighbours").json()["properties"]
        before = batched_calls(client.get("/metrics").text, "neighbours")
    assert props["runtime"] == "sklearn"
    assert props["batching"] == "max_batch_size 32" and "16-row call" in props["batching_basis"]
    x, _ = load_iris(return_X_y=True)
    estimator = joblib.load(served.model_dir / "neighbours" / "model.joblib")
    rows = np.vstack([x, x + 0.05]).astype(np.float32)
    expected = estimator.predict_proba(rows.astype(np.float64))
    ask = rest_probabilities if protocol == "rest" else grpc_probabilities
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: ask(served, rows[i]), range(len(rows))))
    assert np.abs(np.array(got) - expected).max() <= 1e-6
    with served.client() as client:
        assert batched_calls(client.get("/metrics").text, "neighbours") > before


def batched_calls(metrics: str, model: str) -> float:
    match = re.search(rf'^classifier_batch_requests_count{{model="{model}"}} (\S+)$', metrics, re.M)
    return float(match.group(1)) if match else 0.0


def rest_probabilities(server, row: np.ndarray) -> list[float]:
    body = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4], "data": row.tolist()}],
            "outputs": [{"name": "probabilities"}]}
    with server.client() as client:
        return client.post("/v2/models/neighbours/infer", json=body).json()["outputs"][0]["data"]


def grpc_probabilities(server, row: np.ndarray) -> list[float]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = raw_stub(channel)
        m = stub.messages
        request = m["ModelInferRequest"](
            model_name="neighbours", outputs=[m["ModelInferRequest"].InferRequestedOutputTensor(name="probabilities")],
            inputs=[m["ModelInferRequest"].InferInputTensor(
                name="input-0", datatype="FP32", shape=[1, 4],
                contents=m["InferTensorContents"](fp32_contents=row.tolist()))])
        return list(stub.ModelInfer(request).outputs[0].contents.fp32_contents)


def test_column_rows_through_kafka(served, churn, kafka_broker, kafka_topics, bridges):
    """The Kafka ``features`` form for a data-frame model: one object per row, through the real broker and
    bridge; a row missing a column is dead-lettered as the server's 400 and the next row still gets its result."""
    from streaming.messenger import Messenger
    from tests.fixtures.broker import collect

    _, estimator, frame = churn
    topics = kafka_topics(requests=1, results=1, dlq=1)
    bridges(topics, group="columns", grpc_target=served.grpc_target)
    rows = frame.head(3)
    with Messenger(topics["requests"], settings=kafka_broker.messenger_settings()) as messenger:
        messenger.send({"id": "one", "model": "churn", "features": rows.iloc[0].to_dict()}, key="one")
        messenger.send({"id": "bad", "model": "churn", "features": {"age": 30, "city": "rome"}}, key="bad")
        messenger.send({"id": "two", "model": "churn", "features": rows.iloc[1:3].to_dict("records")}, key="two")
    results = {m.key_str: m.json() for m in collect(kafka_broker, topics["results"],
                                                    until=lambda got: {"one", "two"} <= {m.key_str for m in got})}
    names = {key: next(o["data"] for o in doc["outputs"] if o["name"] == "label_name") for key, doc in results.items()}
    assert names["one"] + names["two"] == list(estimator.predict(rows))
    dead = collect(kafka_broker, topics["dlq"], until=lambda got: len(got) >= 1)
    assert dead[0].key_str == "bad" and dead[0].header_str("kcp-dlq-status") == "400"
