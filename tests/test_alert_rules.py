"""The chart's PrometheusRule, checked and unit-tested by the real promtool.

The rules are rendered by helm from tests/helm-values/canary.yaml (every alert on, a canary, matchers narrowing
them to namespace "classifiers"), written out as a Prometheus rule file, checked with ``promtool check rules``
and run against synthetic series with ``promtool test rules``: for each alert, series that make it fire and
series that must not (too few samples, a short outage, feedback typed on the browser page, another namespace).
The series carry the metric names and labels the server and the bridge export.
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import predictors.feedback.prediction_log
import predictors.feedback.prometheus
import predictors.protocol.observability  # noqa: F401 - these three register the server's metrics
from streaming.metrics import BridgeMetrics
from tests.fixtures.k8s import VALUES_DIR, by_kind, helm_template, tool

NS = 'namespace="classifiers"'
TEAM = {"team": "ml"}


@pytest.fixture(scope="module")
def rules() -> dict:
    (rule,) = by_kind(helm_template([VALUES_DIR / "canary.yaml"]), "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


@pytest.fixture(scope="module")
def rule_file(rules, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def alert(rules: dict, name: str) -> dict:
    (found,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == name]
    return found


def expected(rules: dict, name: str, labels: dict[str, str], value: str) -> dict:
    """An exp_alerts entry: the alert's own labels plus ``labels``, and its annotations as Prometheus renders them
    for those labels with ``value`` standing for whatever the template makes of ``$value``."""
    rule = alert(rules, name)

    def render(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        return re.sub(r"\{\{ \$value[^}]*\}\}", value, text)

    return {"exp_labels": {**labels, **rule.get("labels", {})},
            "exp_annotations": {k: render(v) for k, v in rule.get("annotations", {}).items()}}


def promtool_test(rule_file: Path, tests: list[dict], tmp_path: Path) -> None:
    spec = tmp_path / "test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(rule_file)], "evaluation_interval": "1m", "tests": tests},
                                   sort_keys=False))
    proc = subprocess.run([tool("promtool"), "test", "rules", str(spec)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def feedback(model: str, version: str, true: int, predicted: int, values: str, source: str = "api") -> dict:
    return {"series": f'classifier_feedback_total{{{NS}, model="{model}", version="{version}", source="{source}", '
                      f'true_label="{true}", predicted_label="{predicted}", instance="10.0.0.1:8080"}}',
            "values": values}


def test_promtool_checks_the_rules(rule_file, rules):
    proc = subprocess.run([tool("promtool"), "check", "rules", str(rule_file)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert names == {"KcpFeedbackAccuracyDrop", "KcpPredictionLogRowsDropped", "KcpFeedbackStoreDown",
                     "KcpBridgeConsumerLag", "KcpBridgeDeadLetterRate", "KcpCanaryWorse"}
    for group in rules["groups"]:
        for rule in group["rules"]:
            for selector in re.findall(r"\b(classifier_\w+|kcp_bridge_\w+)\{([^}]*)\}", rule["expr"]):
                assert NS in selector[1], f"{selector[0]} in {rule.get('alert') or rule.get('record')} ignores matchers"


def test_rules_read_only_metrics_the_code_exports(rules):
    """A misspelt name never fires and promtool cannot tell (its tests feed whatever names they are given): every
    metric a rule reads is one the server's or the bridge's registry exports, or a series the rules record.
    tests/test_prometheus_live.py checks on live processes that each of them has data."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"]}
    exported = {family.name + suffix for family in [*REGISTRY.collect(), *BridgeMetrics().registry.collect()]
                for suffix in suffixes.get(family.type, [""])}
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in re.findall(r"\b([a-z_:][a-z0-9_:]*)\{", rule["expr"]):
                assert name in exported | recorded, f"{rule.get('alert') or rule.get('record')} reads {name}"
    assert "kcp_bridge_consumer_lag" in exported


def test_accuracy_drop_fires_against_the_trailing_window(rule_file, rules, tmp_path):
    """25 h at 90 %, then an hour at 60 % (iris); mnist's correct cell vanishes (a restarted pod has not
    exported it yet) while wrong answers go on: accuracy 0, not "no data"."""
    promtool_test(rule_file, [{
        "interval": "5m",
        "input_series": [
            feedback("iris", "1", 0, 0, "0+9x300 2706+6x11"),
            feedback("iris", "1", 0, 1, "0+1x300 304+4x11"),
            feedback("mnist", "1", 3, 3, "0+9x288"),
            feedback("mnist", "1", 3, 5, "0+1x288 298+10x23"),
        ],
        "alert_rule_test": [
            {"eval_time": "24h", "alertname": "KcpFeedbackAccuracyDrop", "exp_alerts": []},
            {"eval_time": "26h", "alertname": "KcpFeedbackAccuracyDrop", "exp_alerts": [
                expected(rules, "KcpFeedbackAccuracyDrop", {"model": "iris", **TEAM}, "60%"),
                expected(rules, "KcpFeedbackAccuracyDrop", {"model": "mnist", **TEAM}, "0%")]},
        ],
    }], tmp_path)


def test_accuracy_drop_stays_quiet(rule_file, tmp_path):
    """Steady accuracy; wrong answers typed on the browser page (source="ui"); a fall on too few items; a fall in
    another namespace: none of them fires."""
    promtool_test(rule_file, [{
        "interval": "5m",
        "input_series": [
            feedback("iris", "1", 0, 0, "0+9x312"),
            feedback("iris", "1", 0, 1, "0+1x312"),
            feedback("iris", "1", 0, 2, "0x300 20+20x11", source="ui"),
            feedback("fashion-mnist", "1", 1, 1, "0+2x300 600x12"),
            feedback("fashion-mnist", "1", 1, 2, "0x300 2+2x11"),
            {"series": 'classifier_feedback_total{namespace="other", model="iris", version="1", source="api", '
                       'true_label="0", predicted_label="1"}', "values": "0x300 40+40x11"},
        ],
        "alert_rule_test": [{"eval_time": "26h", "alertname": "KcpFeedbackAccuracyDrop", "exp_alerts": []}],
    }], tmp_path)


def test_prediction_log_and_feedback_store_alerts(rule_file, rules, tmp_path):
    """Rows turned away (a) and rows the database refused (b) fire at once; a feedback store down for longer than
    `for` fires, a two-minute outage and a store of another namespace do not."""
    promtool_test(rule_file, [{
        "interval": "1m",
        "input_series": [
            {"series": f'classifier_prediction_log_dropped_rows_total{{{NS}, instance="a"}}', "values": "0x10 5+5x10"},
            {"series": f'classifier_prediction_log_dropped_rows_total{{{NS}, instance="b"}}', "values": "0x20"},
            {"series": f'classifier_prediction_log_rejected_rows_total{{{NS}, instance="b"}}', "values": "0x12 3x10"},
            {"series": f'classifier_prediction_log_rejected_rows_total{{{NS}, instance="c"}}', "values": "1x20"},
            {"series": f'classifier_feedback_store_up{{{NS}, instance="a"}}', "values": "1x5 0x20"},
            {"series": f'classifier_prediction_log_store_up{{{NS}, instance="a"}}', "values": "1x5 0x20"},
            {"series": f'classifier_feedback_store_up{{{NS}, instance="b"}}', "values": "1x10 0x2 1x10"},
            {"series": 'classifier_feedback_store_up{namespace="other", instance="z"}', "values": "0x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "KcpPredictionLogRowsDropped", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "KcpPredictionLogRowsDropped", "exp_alerts": [
                expected(rules, "KcpPredictionLogRowsDropped", {"namespace": "classifiers", "instance": "a", **TEAM},
                         "25"),
                expected(rules, "KcpPredictionLogRowsDropped", {"namespace": "classifiers", "instance": "b", **TEAM},
                         "3")]},
            {"eval_time": "9m", "alertname": "KcpFeedbackStoreDown", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "KcpFeedbackStoreDown", "exp_alerts": [
                expected(rules, "KcpFeedbackStoreDown", {"namespace": "classifiers", "instance": "a", **TEAM}, "0")]},
        ],
    }], tmp_path)


def test_bridge_lag_and_dead_letter_alerts(rule_file, rules, tmp_path):
    """Lag summed over a topic's partitions fires; a partition reported by two replicas during a rebalance counts
    once (t2: 600 + 300, not 600 + 600 + 300). Dead letters at 10 % of consumed messages fire."""
    lag = "kcp_bridge_consumer_lag"
    promtool_test(rule_file, [{
        "interval": "1m",
        "input_series": [
            {"series": f'{lag}{{{NS}, pod="a", topic="kcp-requests", partition="0"}}', "values": "1500x20"},
            {"series": f'{lag}{{{NS}, pod="b", topic="kcp-requests", partition="1"}}', "values": "100x20"},
            {"series": f'{lag}{{{NS}, pod="a", topic="t2", partition="0"}}', "values": "600x20"},
            {"series": f'{lag}{{{NS}, pod="b", topic="t2", partition="0"}}', "values": "600x20"},
            {"series": f'{lag}{{{NS}, pod="b", topic="t2", partition="1"}}', "values": "300x20"},
            {"series": f'kcp_bridge_consumed_total{{{NS}, pod="a"}}', "values": "0+100x20"},
            {"series": f'kcp_bridge_dead_lettered_total{{{NS}, pod="a", kind="invalid"}}', "values": "0+10x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "KcpBridgeConsumerLag", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "KcpBridgeConsumerLag", "exp_alerts": [
                expected(rules, "KcpBridgeConsumerLag", {"topic": "kcp-requests", **TEAM}, "1600")]},
            {"eval_time": "20m", "alertname": "KcpBridgeDeadLetterRate", "exp_alerts": [
                expected(rules, "KcpBridgeDeadLetterRate", TEAM, "10%")]},
        ],
    }], tmp_path)


def test_dead_letters_at_a_low_rate_stay_quiet(rule_file, tmp_path):
    promtool_test(rule_file, [{
        "interval": "1m",
        "input_series": [
            {"series": f'kcp_bridge_consumed_total{{{NS}, pod="a"}}', "values": "0+100x30"},
            {"series": f'kcp_bridge_dead_lettered_total{{{NS}, pod="a", kind="invalid"}}', "values": "0+1x30"},
            {"series": 'kcp_bridge_dead_lettered_total{namespace="other", pod="x", kind="invalid"}',
             "values": "0+100x30"},
        ],
        "alert_rule_test": [{"eval_time": "30m", "alertname": "KcpBridgeDeadLetterRate", "exp_alerts": []}],
    }], tmp_path)


def z_score(p1: float, p2: float, n1: int, n2: int) -> float:
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    return (p1 - p2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))


def test_canary_worse_fires_on_a_significant_gap(rule_file, rules, tmp_path):
    """iris version 1 at 90 %, canary version 2 at 70 %, 720 items each over the 6 h window."""
    labels = {"model": "iris", **TEAM}
    promtool_test(rule_file, [{
        "interval": "5m",
        "input_series": [
            feedback("iris", "1", 0, 0, "0+9x84"), feedback("iris", "1", 0, 1, "0+1x84"),
            feedback("iris", "2", 0, 0, "0+7x84"), feedback("iris", "2", 0, 1, "0+3x84"),
        ],
        "alert_rule_test": [{"eval_time": "7h", "alertname": "KcpCanaryWorse", "exp_alerts": [
            expected(rules, "KcpCanaryWorse", labels, f"{z_score(0.9, 0.7, 720, 720):.2f}")]}],
    }], tmp_path)


def test_canary_worse_stays_quiet_without_significance(rule_file, tmp_path):
    """A gap within chance (90 % against 88 % on 720 items each), and a large gap on too few items (at 45 min, 90
    items each, under minSamples): neither fires. A better canary never does."""
    assert z_score(0.9, 0.88, 720, 720) < 1.645 < z_score(0.9, 0.5, 90, 90)
    promtool_test(rule_file, [
        {"interval": "5m",
         "input_series": [
             feedback("iris", "1", 0, 0, "0+9x84"), feedback("iris", "1", 0, 1, "0+1x84"),
             feedback("iris", "2", 0, 0, "0+8.8x84"), feedback("iris", "2", 0, 1, "0+1.2x84"),
         ],
         "alert_rule_test": [{"eval_time": "7h", "alertname": "KcpCanaryWorse", "exp_alerts": []}]},
        {"interval": "5m",
         "input_series": [
             feedback("iris", "1", 0, 0, "0+9x84"), feedback("iris", "1", 0, 1, "0+1x84"),
             feedback("iris", "2", 0, 0, "0+5x84"), feedback("iris", "2", 0, 1, "0+5x84"),
         ],
         "alert_rule_test": [{"eval_time": "45m", "alertname": "KcpCanaryWorse", "exp_alerts": []}]},
        {"interval": "5m",
         "input_series": [
             feedback("iris", "1", 0, 0, "0+7x84"), feedback("iris", "1", 0, 1, "0+3x84"),
             feedback("iris", "2", 0, 0, "0+9x84"), feedback("iris", "2", 0, 1, "0+1x84"),
         ],
         "alert_rule_test": [{"eval_time": "7h", "alertname": "KcpCanaryWorse", "exp_alerts": []}]},
    ], tmp_path)


def test_rules_follow_the_values():
    """Off by default (the CRD is prometheus-operator's); no canary, no canary group; thresholds from values."""
    assert not by_kind(helm_template(), "PrometheusRule")
    (rule,) = by_kind(helm_template(set_values={"prometheusRule.enabled": "true",
                                                "prometheusRule.bridgeLag.threshold": "50",
                                                "prometheusRule.deadLetterRate.enabled": "false"}), "PrometheusRule")
    groups = {g["name"]: g for g in rule["spec"]["groups"]}
    assert "kserve-classifiers.canary" not in groups
    (lag,) = groups["kserve-classifiers.bridge"]["rules"]
    assert lag["alert"] == "KcpBridgeConsumerLag" and lag["expr"].endswith("> 50")
    assert "{}" not in yaml.safe_dump(rule["spec"]), "no empty selectors without matchers"
