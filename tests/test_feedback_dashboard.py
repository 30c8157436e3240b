"""The Grafana dashboard: valid PromQL, only metrics the code exports, and the right numbers.

Every query is parsed with a real PromQL parser (promql-parser) and its metric names are checked
against what the code registers in prometheus_client's default registry (the feedback metrics,
the server's request and step metrics, the bridge's ``kcp_bridge_*``). When Prometheus's ``promtool`` is available
(Debian package ``prometheus``), the precision / recall / accuracy / confusion-matrix queries are
also evaluated by Prometheus's own engine on counters split across two replicas and compared with
scikit-learn.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import promql_parser
import pytest
from prometheus_client import REGISTRY
from sklearn.metrics import precision_recall_fscore_support

import predictors.feedback.prometheus  # registers the feedback metrics
import predictors.protocol.observability  # noqa: F401 - registers the server's request metrics
from streaming.metrics import BridgeMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "predictors" / "dashboards" / "grafana-classification.json"
BRIDGE_WIDE = {"kcp_bridge_consumer_lag", "kcp_bridge_consumed_total", "kcp_bridge_dead_lettered_total",
               "kcp_bridge_latency_seconds_bucket"}
"""Bridge metrics without a model label (a message names its model only once decoded): no $model in their query."""
GRAFANA_VARS = {"$__rate_interval": "10m", "$__range": "10m", "$model": "iris"}
SUFFIXES = {"counter": ["_total", "_created"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum", "_created"],
            "summary": ["", "_count", "_sum", "_created"], "info": ["_info"], "untyped": [""]}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def exported_names() -> set[str]:
    """Every sample name the process's default registry (the server) and a bridge's registry can expose."""
    names: set[str] = set()
    for family in [*REGISTRY.collect(), *BridgeMetrics().registry.collect()]:
        names.update(family.name + s for s in SUFFIXES.get(family.type, [""]))
    return names


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in re.sub(r'"[^"]*"', "", expr), f"unknown Grafana variable in {expr}"
    return expr


def metric_names(node: Any) -> set[str]:
    """Metric names a parsed PromQL expression reads (selector names and __name__ matchers)."""
    if isinstance(node, promql_parser.VectorSelector):
        found = {node.name} if node.name else set()
        for m in node.matchers.matchers:
            if m.name == "__name__":
                found.update(m.value.split("|") if m.op == promql_parser.MatchOp.Re else [m.value])
        return found
    children: list[Any] = []
    for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, str | int | float):
            children.append(child)
    children += list(getattr(node, "args", None) or [])
    return set().union(*(metric_names(c) for c in children)) if children else set()


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    """The series selectors inside label_values(...) of query variables."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert m, f"unexpected variable query {query}"
            out.append(m.group(1))
    return out


def test_variables_and_datasources(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["type"] == "query"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            if metric_names(promql_parser.parse(substitute(target["expr"]))) <= BRIDGE_WIDE:
                continue
            assert "$model" in target["expr"], f"{panel['title']}: query ignores the model variable"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_query_parses_and_reads_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    exported = exported_names()
    referenced: set[str] = set()
    queries = [*panel_queries(dashboard), *(("variable", q) for q in variable_queries(dashboard))]
    for title, expr in queries:
        try:
            parsed = promql_parser.parse(substitute(expr))
        except Exception as exc:  # the parser raises ValueError-like errors with the position
            pytest.fail(f"panel {title!r}: invalid PromQL {expr!r}: {exc}")
        names = metric_names(parsed)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"panel {title!r} reads metrics nobody exports: {sorted(unknown)}"
        referenced |= names
    # The dashboard really covers what the issue asks for.
    assert {"classifier_feedback_total", "classifier_feedback_accuracy", "classifier_feedback_macro_f1",
            "classifier_feedback_rejected_total", "classifier_request_predict_seconds_count",
            "classifier_request_preprocess_seconds_bucket", "classifier_request_predict_seconds_bucket",
            "classifier_request_postprocess_seconds_bucket", "classifier_requests_total",
            "kcp_bridge_consumer_lag", "kcp_bridge_dead_lettered_total"} <= referenced
    assert not {n for n in referenced if n.startswith("request_")}, "KServe's histograms stay empty on /infer"


def test_panels_cover_quality_and_serving(dashboard: dict[str, Any]) -> None:
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for word in ("accuracy", "macro f1", "precision per class", "recall per class", "confusion matrix",
                 "request rate", "latency", "consumer lag", "bridge throughput"):
        assert word in titles, word


# --- evaluating the queries with Prometheus's engine ----------------------------------------------


def find_promtool() -> str | None:
    local = DASHBOARD.parents[2] / ".tools" / "bin" / "promtool"  # scripts/install-promtool.sh puts it there
    for candidate in (os.environ.get("KCP_PROMTOOL"), str(local), shutil.which("promtool"), "/usr/bin/promtool"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def query_by_title(dashboard: dict[str, Any], title: str, index: int = 0) -> str:
    for panel in dashboard["panels"]:
        if panel["title"] == title:
            return substitute(panel["targets"][index]["expr"])
    raise KeyError(title)


def test_quality_queries_evaluate_to_sklearn_values(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = find_promtool()
    if promtool is None:
        pytest.skip("promtool not found: install Debian's prometheus package (apt-get install -y prometheus) "
                    "or set KCP_PROMTOOL to evaluate the dashboard's PromQL")
    # True labels in rows, predictions in columns; split between two replicas that each count their share.
    matrix = np.array([[3, 1, 4], [0, 2, 6], [1, 1, 6]])
    replica_a = np.array([[1, 1, 2], [0, 2, 1], [1, 0, 3]])
    replica_b = matrix - replica_a
    series = []
    for instance, counts in (("a", replica_a), ("b", replica_b)):
        for t in range(3):
            for p in range(3):
                series.append({"series": f'classifier_feedback_total{{model="iris",true_label="{t}",'
                                         f'predicted_label="{p}",instance="{instance}"}}',
                               "values": f"0 {counts[t, p]}"})
    y_true = np.repeat(np.repeat(np.arange(3), 3), matrix.ravel())
    y_pred = np.repeat(np.tile(np.arange(3), 3), matrix.ravel())
    precision, recall, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)

    def per_class(values: np.ndarray) -> list[dict[str, Any]]:
        return [{"labels": f'{{label="{i}",model="iris"}}', "value": float(v)} for i, v in enumerate(values)]

    tests = [
        (query_by_title(dashboard, "Precision per class (range)"), per_class(precision)),
        (query_by_title(dashboard, "Recall per class (range)"), per_class(recall)),
        (query_by_title(dashboard, "Accuracy (dashboard range)"),
         [{"labels": '{model="iris"}', "value": float(np.trace(matrix) / matrix.sum())}]),
        (query_by_title(dashboard, "Confusion matrix (range; rows: true label, columns: predicted label)"),
         [{"labels": f'{{predicted_label="{p}",true_label="{t}"}}', "value": float(matrix[t, p])}
          for t in range(3) for p in range(3)]),
    ]
    spec = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "10m",
        "input_series": series,
        "promql_expr_test": [{"expr": expr, "eval_time": "10m", "exp_samples": exp} for expr, exp in tests],
    }]}
    test_file = tmp_path / "dashboard_test.yaml"
    test_file.write_text(json.dumps(spec, indent=2))  # JSON is YAML
    proc = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
