"""Every Grafana panel and every alert rule shows data from a real Prometheus scraping a real server and bridge.

A query can be valid PromQL over registered names and still return nothing: the series is exported on a code
path traffic does not take (KServe's per-step histograms on ``/infer``), a label is named differently on the
two sides, or a rule reads a metric no process exports. So: Prometheus (the server from Debian's package,
``scripts/install-promtool.sh``) scrapes two model servers every second (iris version 1 and, as its canary,
version 2, as the chart deploys them) and a bridge on the embedded Kafka broker, with the chart's alert and
recording rules loaded (rendered from tests/helm-values/canary.yaml, windows shortened to seconds). After real
traffic (REST requests, a request for an unknown model, feedback with a rejected item, Kafka requests and a
dead letter), every dashboard query (Grafana variables replaced by values) and every rule expression (alerts
with their comparisons stripped, so the inner query is judged, not whether it fires) is evaluated through
Prometheus's HTTP API. The test fails naming each panel or rule whose query returns nothing. The servers and
the bridge run with ``KCP_LOG_FORMAT=json``: their logs must be JSON lines (tests/test_prometheus_logs.py has
the unit tests of the formatters and of the trace context).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml

from streaming.messenger import Messenger
from tests.fixtures.broker import BridgeProcess, KafkaBroker, launch_bridge
from tests.fixtures.k8s import TOOLS_BIN, VALUES_DIR, by_kind, helm_template
from tests.fixtures.ports import free_port, stop_process, wait_for
from tests.fixtures.server import REPO, TRAINED_MODELS, ServerHandle, start_model_server

DASHBOARD = REPO / "predictors" / "dashboards" / "grafana-classification.json"
NAMESPACE = "classifiers"  # canary.yaml narrows the rules to it; the scrape configs add it as a target label
WINDOWS = {  # the chart's windows are hours: seconds here, so a one-minute test fills them
    "prometheusRule.accuracyDrop.window": "15s", "prometheusRule.accuracyDrop.trailingWindow": "15s",
    "prometheusRule.canaryWorse.window": "30s", "prometheusRule.deadLetterRate.window": "30s",
}
GRAFANA_VARS = {"$__rate_interval": "20s", "$__range": "60s", "$model": "iris"}
HISTORY_S = 35  # the accuracy rule's trailing window ends 15 s back and is 15 s long, plus scrapes to fill it
SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]
COMPARISONS = {"<", ">", "<=", ">=", "==", "!="}
JSON_LOGS = {"KCP_LOG_FORMAT": "json"}
TEXT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[.,]\d{3} ")  # KServe's and the bridge's text format


def prometheus_binary() -> str:
    path = TOOLS_BIN / "prometheus"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run scripts/install-promtool.sh (make tools)")
    return str(path)


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]


@contextlib.contextmanager
def run_prometheus(tmp: Path, rule_file: Path, targets: dict[str, list[str]]) -> Iterator[Prometheus]:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rule_file)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts, "labels": {"namespace": NAMESPACE}}]}
                           for job, hosts in targets.items()],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([prometheus_binary(), f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
            return False

        wait_for(ready, timeout=60, what="prometheus ready")
        yield Prometheus(url)
    finally:
        stop_process(proc)


def versioned_iris(root: Path, version: str) -> Path:
    """A model directory holding only iris, as ``version`` (two servers stand for the chart's two revisions)."""
    target = root / f"v{version}" / "iris"
    shutil.copytree(TRAINED_MODELS / "iris", target)
    config = json.loads((target / "config.json").read_text())
    config["version"] = version
    (target / "config.json").write_text(json.dumps(config))
    return target.parent


def rule_groups() -> list[dict[str, Any]]:
    (rule,) = by_kind(helm_template([VALUES_DIR / "canary.yaml"], set_values=WINDOWS), "PrometheusRule")
    return rule["spec"]["groups"]


# --- traffic --------------------------------------------------------------------------------------------


def rest_traffic(server: ServerHandle) -> None:
    with server.client() as client:
        for features in (SETOSA, VIRGINICA, SETOSA):
            r = client.post("/v2/models/iris/infer", json={"inputs": [
                {"name": "input-0", "datatype": "FP32", "shape": [1, 4], "data": features}]})
            assert r.status_code == 200, r.text
        assert client.post("/v2/models/no-such-model/infer", json={"inputs": []}).status_code == 404
        # feedback with right and wrong answers (every dashboard ratio has a numerator), and one rejected item
        r = client.post("/v2/models/iris/feedback", json={"predicted_label": [0, 1, 2, 2, 0, 1],
                                                          "true_label": [0, 1, 2, 1, 0, 2]})
        assert r.status_code == 200, r.text
        assert client.post("/v2/models/iris/feedback",
                           json={"predicted_label": [0], "true_label": [7]}).status_code >= 400


def kafka_traffic(broker: KafkaBroker, topics: dict[str, str], bridge: BridgeProcess) -> None:
    run = uuid.uuid4().hex[:6]
    with Messenger(topics["requests"], settings=broker.messenger_settings()) as sender:
        for i in range(6):
            sender.send({"id": f"{run}-{i}", "features": SETOSA if i % 2 else VIRGINICA}, key=f"{run}-{i}")
        sender.send(b'{"inputs": [', key=f"{run}-bad")  # a dead letter
        sender.flush()
    wait_for(lambda: bridge.metric("kcp_bridge_produced_total") >= 6
             and bridge.metric("kcp_bridge_dead_lettered_total") >= 1, timeout=90, what="bridge results")
    wait_for(lambda: "kcp_bridge_consumer_lag{" in httpx.get(f"{bridge.url}/metrics", timeout=2).text,
             timeout=30, what="the bridge's consumer lag")


# --- the queries ----------------------------------------------------------------------------------------


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(what, PromQL) for every panel target and every query variable's series selector."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", substitute(target["expr"])))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            selector = query[len("label_values("):query.rindex(",")]
            out.append((f"variable ${var['name']}", substitute(selector)))
    return out


def children(node: Any) -> list[Any]:
    found = [getattr(node, a, None) for a in ("expr", "lhs", "rhs", "param")]
    found += list(getattr(node, "args", None) or [])
    return [c for c in found if c is not None and not isinstance(c, str | int | float)]


def strip_comparisons(expr: str) -> str:
    """``expr`` with every filtering comparison replaced by its left side: ``x > 5`` -> ``x``, ``(a < on (m)
    b) and c >= 50`` -> ``(a) and c``. The rule's inner query: data whether or not the alert would fire."""
    root = promql_parser.parse(expr)
    found: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.BinaryExpr) and str(node.op) in COMPARISONS and " bool " not in str(node):
            found.append(node)
        for child in children(node):
            walk(child)

    walk(root)
    text = str(root)
    for node in found:  # outermost first: an inner comparison in a kept left side is still in the text
        text = text.replace(str(node), f"({node.lhs})")
    promql_parser.parse(text)
    return text


def rule_queries(groups: list[dict[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for group in groups:
        for rule in group["rules"]:
            if "record" in rule:
                out.append((f"recording rule {rule['record']}", rule["expr"]))
            else:
                out.append((f"alert {rule['alert']} (comparisons stripped)", strip_comparisons(rule["expr"])))
    return out


def test_strip_comparisons() -> None:
    assert strip_comparisons("sum(x) > 5") == "(sum(x{}))"
    stripped = strip_comparisons("(a / b < on (model) c - 0.05) and on (model) d >= 50")
    assert promql_parser.parse(stripped) and "<" not in stripped and ">=" not in stripped, stripped
    assert "a{} / b{}" in stripped and "and on (model) (d{})" in stripped, stripped


# --- the test -------------------------------------------------------------------------------------------


def test_every_dashboard_and_alert_query_returns_data(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    groups = rule_groups()
    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    suffix = uuid.uuid4().hex[:6]
    topics = {"requests": f"prom-req-{suffix}", "results": f"prom-res-{suffix}", "dlq": f"prom-dlq-{suffix}"}
    kafka_broker.create_topics({topics["requests"]: 2, topics["results"]: 1, topics["dlq"]: 1})
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    with contextlib.ExitStack() as stack:
        primary = stack.enter_context(start_model_server(versioned_iris(tmp_path, "1"), tmp_path / "s1",
                                                         env=JSON_LOGS))
        canary = stack.enter_context(start_model_server(versioned_iris(tmp_path, "2"), tmp_path / "s2",
                                                        env=JSON_LOGS))
        bridge = launch_bridge(kafka_broker.env(), topics, tmp_path, group=f"prom-{suffix}",
                               grpc_target=primary.grpc_target, env=JSON_LOGS)
        stack.callback(bridge.stop)
        prometheus = stack.enter_context(run_prometheus(tmp_path, rule_file, {
            "predictor": [f"127.0.0.1:{primary.http_port}", f"127.0.0.1:{canary.http_port}"],
            "bridge": [f"127.0.0.1:{bridge.health_port}"]}))
        started = time.monotonic()
        for server in (primary, canary):
            rest_traffic(server)
        kafka_traffic(kafka_broker, topics, bridge)
        time.sleep(max(0.0, HISTORY_S - (time.monotonic() - started)))
        targets = httpx.get(f"{prometheus.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        down = [(t["scrapeUrl"], t["lastError"]) for t in targets if t["health"] != "up"]
        assert not down, f"targets Prometheus could not scrape: {down}"

        queries = [*dashboard_queries(), *rule_queries(groups)]
        empty = [f"{what}: {expr}" for what, expr in queries if not prometheus.query(expr)]
        assert not empty, "queries that return no data:\n" + "\n".join(empty)
        # the direct path's step histograms carry model and version
        versions = {s["metric"]["version"] for s in prometheus.query("classifier_request_predict_seconds_count")}
        assert versions == {"1", "2"}
        served = prometheus.query('classifier_requests_total{model="iris"}')
        assert {s["metric"]["version"] for s in served} == {"1", "2"}, "the request counters carry the version"
        produced = prometheus.query("kcp_bridge_produced_total")
        assert {(s["metric"]["model"], s["metric"]["version"]) for s in produced} == {("iris", "1")}
        lag = prometheus.query("kcp_bridge_consumer_lag")
        assert {s["metric"]["topic"] for s in lag} == {topics["requests"]}
        assert all(float(s["value"][1]) >= 0 for s in lag)  # tansu's end offsets are rough: sane, not exact
        for name, text in (("server", primary.log()), ("bridge", bridge.log())):
            assert_json_logs(name, text)
        requests = [json.loads(line) for line in primary.log().splitlines() if '"predictors.requests"' in line]
        assert {(r["model"], r["version"], r["protocol"], r["status"]) for r in requests} >= {
            ("iris", "1", "rest", "200"), ("_unknown", None, "rest", "404"), ("iris", "1", "grpc", "OK")}, requests


def assert_json_logs(name: str, text: str) -> None:
    """Every log record is a JSON line (other output, such as a library's warning printed to stderr, may be text,
    but nothing in the text formats of KServe or the bridge)."""
    records = []
    for line in text.splitlines():
        assert not TEXT_LOG_LINE.match(line), f"{name} logged text with KCP_LOG_FORMAT=json: {line!r}"
        if line.startswith("{"):
            records.append(json.loads(line))
    assert len(records) >= 2 and all({"time", "level", "logger", "message"} <= r.keys() for r in records), text[-2000:]
