"""The Helm chart: lint, render for every value set, reject bad values, and keep manifests/ in sync.

Value sets live in tests/helm-values/*.yaml (plus the chart's defaults); every file under
tests/helm-values/invalid/ must be refused, with the message its first line (``# schema|fail: ...``) names.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures.k8s import (
    CHART,
    REPO,
    VALUES_DIR,
    by_kind,
    helm_args,
    helm_template,
    helm_template_text,
    run,
    secrets_api,
    tool,
)
from tests.support.netpol import Pod, allowed, selects

VALUE_SETS = [None, *sorted(VALUES_DIR.glob("*.yaml"))]
INVALID = sorted((VALUES_DIR / "invalid").glob("*.yaml"))
STANDARD_LABELS = ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of", "app.kubernetes.io/component")


def values_of(values_file) -> dict:
    """The merged values (chart defaults + file), as helm sees them, for assertions."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    if values_file:
        merged = _merge(merged, yaml.safe_load(values_file.read_text()))
    return merged


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(values_file) -> list[dict]:
    return helm_template([values_file] if values_file else [])


RUNTIME_KINDS = ("ServingRuntime", "ClusterServingRuntime")


def runtimes(objects: list[dict]) -> dict[str, dict]:
    """The rendered serving runtimes by name (namespaced or cluster-scoped)."""
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in RUNTIME_KINDS}


def _merge_named(base: list[dict], over: list[dict], key: str) -> list[dict]:
    out = [dict(x) for x in base]
    for item in over:
        same = [i for i, x in enumerate(out) if x.get(key) == item.get(key)]
        if same:
            out[same[0]] = {**out[same[0]], **item}
        else:
            out.append(item)
    return out


def kserve_container(objects: list[dict], isvc: dict) -> dict:
    """The container KServe runs for ``isvc``: its runtime's first container merged with predictor.model the way
    KServe merges them (a strategic merge patch: env by name, ports by containerPort, volumeMounts by mountPath,
    resources per key, scalars replaced), except args, which KServe appends to the runtime's."""
    model = isvc["spec"]["predictor"]["model"]
    runtime = runtimes(objects)[model["runtime"]]
    (base, *_) = runtime["spec"]["containers"]
    skip = {"modelFormat", "runtime", "protocolVersion", "storageUri", "runtimeVersion", "storage"}
    merged = dict(base)
    for key, value in model.items():
        if key in skip:
            continue
        if key == "args":
            merged["args"] = [*base.get("args", []), *value]
        elif key == "env":
            merged["env"] = _merge_named(base.get("env", []), value, "name")
        elif key == "ports":
            merged["ports"] = _merge_named(base.get("ports", []), value, "containerPort")
        elif key == "volumeMounts":
            merged["volumeMounts"] = _merge_named(base.get("volumeMounts", []), value, "mountPath")
        elif key == "resources":
            current = base.get("resources", {})
            merged["resources"] = {k: {**current.get(k, {}), **value.get(k, {})} for k in {*current, *value}}
        else:
            merged[key] = value
    return merged


def ids(value_sets) -> list[str]:
    return [p.stem if p else "defaults" for p in value_sets]


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids(VALUE_SETS))
def test_helm_lint_strict(values_file):
    proc = run([tool("helm"), "lint", "--strict", str(CHART), *helm_args([values_file] if values_file else [])],
               check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids(VALUE_SETS))
def test_one_inference_service_per_model(values_file):
    values = values_of(values_file)
    objects = render(values_file)
    isvcs = {o["metadata"]["name"]: o for o in by_kind(objects, "InferenceService")}
    assert list(isvcs) == [m["name"] for m in values["models"]]
    knative = values["kserve"]["deploymentMode"] == "Knative"
    for model in values["models"]:
        isvc = isvcs[model["name"]]
        assert isvc["metadata"]["namespace"] == "classifiers"
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == values["kserve"]["deploymentMode"]
        predictor = isvc["spec"]["predictor"]
        assert "containers" not in predictor, "KServe-native: predictor.model with a serving runtime, no own container"
        spec = predictor["model"]
        assert spec["modelFormat"] == {"name": model["format"]}
        assert spec["runtime"] == f"kcp-kserve-classifiers-{model['format']}"
        assert spec["protocolVersion"] == "v2"
        assert spec["storageUri"] == model.get("canary", model)["storageUri"]
        assert predictor.get("canaryTrafficPercent") == model.get("canary", {}).get("trafficPercent")
        assert predictor["terminationGracePeriodSeconds"] >= 80, "request drains + the prediction log's last flush"
        container = kserve_container(objects, isvc)
        assert container["name"] == "kserve-container"
        assert container["command"] == ["python", "-m", "predictors", "serve"]
        args = container["args"]
        assert args[args.index("--model_dir") + 1] == "/mnt/models", "where KServe's storage initializer puts it"
        for key in ("minReplicas", "maxReplicas"):
            assert predictor.get(key) == model.get(key)
        for key in ("scaleMetric", "scaleTarget", "scaleMetricType"):
            assert predictor.get(key) == model.get("autoscaling", {}).get(key)
        runtime_resources = values["runtimes"][model["format"]].get("resources")
        assert container["resources"] == model.get("resources", runtime_resources or values["predictor"]["resources"])
        batching = model.get("batching", {})
        if "maxBatchSize" in batching:
            assert args[args.index("--max_batch_size") + 1] == str(batching["maxBatchSize"])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if not knative:
            assert ports == {"http1": 8080, "h2c": 8081}, "Standard mode exposes REST and gRPC"
        elif values["kserve"]["knativeProtocol"] == "grpc":
            assert ports == {"h2c": 8081}, "Knative allows one port: gRPC"
        else:
            assert ports == {"http1": 8080}, "Knative allows one port: REST"
        if "http1" in ports:
            assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
            assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
        assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp", "/var/lib/kcp"}


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids(VALUE_SETS))
def test_one_serving_runtime_per_format(values_file):
    values = values_of(values_file)
    objects = render(values_file)
    found = runtimes(objects)
    enabled = [f for f in ("sklearn", "keras", "katonic") if values["runtimes"][f]["enabled"]]
    assert sorted(found) == sorted(f"kcp-kserve-classifiers-{f}" for f in enabled)
    kind = "ClusterServingRuntime" if values["runtimes"]["scope"] == "Cluster" else "ServingRuntime"
    for fmt in enabled:
        runtime = found[f"kcp-kserve-classifiers-{fmt}"]
        assert runtime["kind"] == kind and runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
        assert ("namespace" in runtime["metadata"]) == (kind == "ServingRuntime"), "a cluster runtime has no namespace"
        spec = runtime["spec"]
        assert spec["supportedModelFormats"] == [{"name": fmt, "autoSelect": False}], \
            "autoSelect off: never picked for other InferenceServices of the same format"
        assert spec["protocolVersions"] == ["v2"]
        assert spec["annotations"] == {"prometheus.kserve.io/port": "8080", "prometheus.kserve.io/path": "/metrics"}
        (container,) = spec["containers"]
        image = values["runtimes"][fmt]["image"]
        assert container["image"].split("/")[-1].startswith(image["repository"])
        assert {v["name"] for v in spec["volumes"]} == {"tmp", "data"}
    images = {f: found[f"kcp-kserve-classifiers-{f}"]["spec"]["containers"][0]["image"] for f in enabled}
    if "sklearn" in images:
        assert "kserve-classifiers-sklearn" in images["sklearn"], "scikit-learn models get the image without TensorFlow"
    if "keras" in images:
        assert "kserve-classifiers-predictor" in images["keras"]


def test_a_canary_serves_version_n_plus_1_next_to_the_rolled_out_one(tmp_path):
    objects = helm_template([VALUES_DIR / "canary.yaml"])
    isvcs = {i["metadata"]["name"]: i for i in by_kind(objects, "InferenceService")}
    predictor = isvcs["iris"]["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["model"]["storageUri"] == "s3://models-bucket/classifiers/iris/2", \
        "the spec names version N+1; KServe keeps the last rolled-out revision for the other 90 %"
    assert "canaryTrafficPercent" not in isvcs["iris-katonic"]["spec"]["predictor"]
    values = values_of(VALUES_DIR / "canary.yaml")
    iris = values["models"][0]
    iris.update(storageUri=iris.pop("canary")["storageUri"], version="2")
    (tmp_path / "promoted.yaml").write_text(yaml.safe_dump({"models": values["models"]}))
    promoted = helm_template([VALUES_DIR / "canary.yaml", tmp_path / "promoted.yaml"])
    (iris, _) = by_kind(promoted, "InferenceService")
    assert iris["spec"]["predictor"]["model"]["storageUri"].endswith("/iris/2")
    assert "canaryTrafficPercent" not in iris["spec"]["predictor"], "promoted: 100 % to version 2"


def test_cluster_local_visibility_by_default():
    for objects in (helm_template(), helm_template([VALUES_DIR / "knative-kafkasource.yaml"])):
        for isvc in by_kind(objects, "InferenceService"):
            assert isvc["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    published = helm_template([VALUES_DIR / "knative-kafkasource.yaml"], {"kserve.clusterLocal": "false"})
    for isvc in by_kind(published, "InferenceService"):
        assert "networking.kserve.io/visibility" not in isvc["metadata"]["labels"]


def test_safe_defaults():
    """The defaults: API key on with a NetworkPolicy, one pod per model with SQLite, cluster-local, a grace period
    covering the shutdown, and a bridge whose default models are deployed ones."""
    values = values_of(None)
    objects = helm_template()
    assert values["apiKey"]["enabled"] and values["networkPolicy"]["enabled"]
    assert by_kind(objects, "NetworkPolicy")
    (isvc,) = by_kind(objects, "InferenceService")
    env = {e["name"]: e for e in isvc["spec"]["predictor"]["model"]["env"]}
    assert env["KCP_FEEDBACK_DB_URL"]["value"].startswith("sqlite:")
    assert isvc["spec"]["predictor"]["maxReplicas"] == 1, "SQLite lives in the pod: one pod"
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] >= 30 + 30 + 20
    (bridge,) = by_kind(objects, "Deployment")
    benv = {e["name"]: e.get("value") for e in bridge["spec"]["template"]["spec"]["containers"][0]["env"]}
    deployed = {m["name"] for m in values["models"]}
    assert benv["KCP_BRIDGE_DEFAULT_ROW_MODEL"] in deployed and benv["KCP_BRIDGE_DEFAULT_IMAGE_MODEL"] in deployed
    multi = helm_template([VALUES_DIR / "multi-model.yaml"])
    (bridge,) = by_kind(multi, "Deployment")
    benv = {e["name"]: e.get("value") for e in bridge["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (benv["KCP_BRIDGE_DEFAULT_ROW_MODEL"], benv["KCP_BRIDGE_DEFAULT_IMAGE_MODEL"]) == ("iris", "mnist"), \
        "the first sklearn and the first keras model"
    allowed = helm_template(set_values={"models[0].name": "iris", "models[0].format": "sklearn",
                                        "models[0].storageUri": "pvc://m/iris", "models[0].maxReplicas": "3",
                                        "feedback.database.allowSqliteWithReplicas": "true"})
    (isvc,) = by_kind(allowed, "InferenceService")
    assert isvc["spec"]["predictor"]["maxReplicas"] == 3, "SQLite with replicas only when asked for explicitly"


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids(VALUE_SETS))
def test_standard_labels_on_every_object(values_file):
    for obj in render(values_file):
        labels = obj["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == "kcp"


def test_api_key_secret_generated_or_fixed_or_existing():
    (secret,) = by_kind(helm_template(), "Secret")
    key = base64.b64decode(secret["data"]["api-key"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", key), "a generated key is 40 random letters and digits"
    (isvc,) = by_kind(helm_template(), "InferenceService")
    env = {e["name"]: e for e in isvc["spec"]["predictor"]["model"]["env"]}
    assert env["KCP_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "api-key"}

    fixed = by_kind(helm_template([VALUES_DIR / "postgresql.yaml"]), "Secret")
    api = next(s for s in fixed if s["metadata"]["name"].endswith("-api-key"))
    assert base64.b64decode(api["data"]["api-key"]).decode() == "not-a-real-key-but-a-fixed-one"

    objects = helm_template([VALUES_DIR / "existing-secret.yaml"])
    assert not by_kind(objects, "Secret"), "an existing Secret is used, none is created"
    (isvc,) = by_kind(objects, "InferenceService")
    env = {e["name"]: e for e in isvc["spec"]["predictor"]["model"]["env"]}
    assert env["KCP_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "classifiers-api-key", "key": "token"}
    assert env["KCP_FEEDBACK_DB_URL"]["valueFrom"]["secretKeyRef"] == {"name": "feedback-db", "key": "sqlalchemy-url"}
    (bridge,) = by_kind(objects, "Deployment")
    benv = {e["name"]: e for e in bridge["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert benv["KCP_V2_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "classifiers-api-key", "key": "token"}
    assert benv["KCP_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_PLAINTEXT"
    assert benv["KCP_KAFKA_SASL_PLAIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "kafka-credentials",
                                                                                   "key": "password"}


def test_api_key_disabled_means_no_secret_and_no_env():
    objects = helm_template(set_values={"apiKey.enabled": "false"})
    assert not [s for s in by_kind(objects, "Secret") if s["metadata"]["name"].endswith("-api-key")]
    (isvc,) = by_kind(objects, "InferenceService")
    assert "KCP_API_KEY" not in {e["name"] for e in kserve_container(objects, isvc)["env"]}


def test_feedback_database_url_goes_through_a_secret():
    objects = helm_template([VALUES_DIR / "postgresql.yaml"])
    db = next(s for s in by_kind(objects, "Secret") if s["metadata"]["name"].endswith("-feedback-db"))
    assert db["stringData"]["url"].startswith("postgresql+psycopg://")
    (isvc,) = by_kind(objects, "InferenceService")
    env = {e["name"]: e for e in isvc["spec"]["predictor"]["model"]["env"]}
    assert env["KCP_FEEDBACK_DB_URL"] == {"name": "KCP_FEEDBACK_DB_URL", "valueFrom": {
        "secretKeyRef": {"name": db["metadata"]["name"], "key": "url"}}}
    # the default: SQLite on the pod's writable emptyDir
    objects = helm_template()
    (isvc,) = by_kind(objects, "InferenceService")
    env = {e["name"]: e for e in isvc["spec"]["predictor"]["model"]["env"]}
    assert env["KCP_FEEDBACK_DB_URL"]["value"] == "sqlite:////var/lib/kcp/feedback.db"
    mounts = {m["mountPath"] for m in kserve_container(objects, isvc)["volumeMounts"]}
    assert "/var/lib/kcp" in mounts


def test_prometheus_annotations_and_service_monitors():
    objects = helm_template([VALUES_DIR / "multi-model.yaml"])
    for isvc in by_kind(objects, "InferenceService"):
        assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
        pod = isvc["spec"]["predictor"]["annotations"]
        assert pod == {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
    monitors = {m["metadata"]["name"]: m for m in by_kind(objects, "ServiceMonitor")}
    predictors = monitors["kcp-kserve-classifiers"]
    assert predictors["metadata"]["labels"]["release"] == "prometheus"
    (expr, component) = predictors["spec"]["selector"]["matchExpressions"]
    assert expr["key"] == "serving.kserve.io/inferenceservice"
    assert expr["values"] == ["iris", "mnist", "fashion-mnist"]
    assert component == {"key": "component", "operator": "In", "values": ["predictor"]}
    assert predictors["spec"]["endpoints"][0]["port"] == "http1"
    assert monitors["kcp-kserve-classifiers-bridge"]["spec"]["endpoints"][0]["port"] == "metrics"
    assert not by_kind(helm_template(), "ServiceMonitor"), "off by default"


def test_grafana_dashboard_configmap_is_the_project_dashboard():
    (cm,) = by_kind(helm_template(), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    rendered = json.loads(cm["data"]["grafana-classification.json"])
    source = json.loads((REPO / "predictors" / "dashboards" / "grafana-classification.json").read_text())
    assert rendered == source
    assert not by_kind(helm_template(set_values={"grafanaDashboard.enabled": "false"}), "ConfigMap")


def test_knative_mode_delivers_to_the_bridge_which_writes_the_results():
    """One contract for both modes: the KafkaSource consumes, the bridge (the same command, --source http) decodes,
    calls the model with the API key and writes results and dead letters itself; Knative's own KafkaSink only takes
    the records it gives up on."""
    objects = helm_template([VALUES_DIR / "knative-kafkasource.yaml"])
    (dep,) = by_kind(objects, "Deployment")
    (source,) = by_kind(objects, "KafkaSource")
    (dead,) = by_kind(objects, "KafkaSink")
    (service,) = [s for s in by_kind(objects, "Service") if s["metadata"]["name"] == "kcp-kserve-classifiers-bridge"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--source") + 1] == "http" and args[args.index("--http-port") + 1] == "8080"
    assert args[args.index("--http-host") + 1] == "0.0.0.0" and "--group" not in args
    assert args[args.index("--result-topic") + 1] == "image-results"
    assert args[args.index("--dead-letter-topic") + 1] == "kcp-dead-letters"
    assert args[args.index("--rest-url") + 1] == "http://fashion-mnist-predictor.classifiers.svc.cluster.local"
    env = {e["name"]: e for e in container["env"]}
    assert env["KCP_V2_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "kcp-kserve-classifiers-api-key"
    assert env["KCP_BRIDGE_MESSAGE_DEADLINE_S"]["value"] == "20"
    assert env["KCP_BRIDGE_DEAD_LETTER_TIMEOUT_S"]["value"] == "5"
    assert env["KCP_BRIDGE_HTTP_MAX_BODY_BYTES"]["value"] == "16777216"
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"} in service["spec"]["ports"]
    assert source["spec"]["topics"] == ["image-requests"]
    assert source["spec"]["consumerGroup"] == "fashion-knative"
    assert source["spec"]["initialOffset"] == "earliest" and source["spec"]["ordering"] == "unordered"
    assert source["spec"]["sink"] == {"ref": {"apiVersion": "v1", "kind": "Service",
                                              "name": "kcp-kserve-classifiers-bridge"}}
    assert source["spec"]["delivery"] == {
        "retry": 3, "backoffPolicy": "exponential", "backoffDelay": "PT0.5S", "timeout": "PT30S",
        "deadLetterSink": {"ref": {"apiVersion": "eventing.knative.dev/v1alpha1", "kind": "KafkaSink",
                                   "name": "kcp-kserve-classifiers-dead-letters"}}}
    sasl = source["spec"]["net"]["sasl"]
    assert sasl["enable"] is True and sasl["password"]["secretKeyRef"] == {"name": "kafka-auth", "key": "password"}
    assert source["spec"]["net"]["tls"]["cert"]["secretKeyRef"]["key"] == "user.crt"
    assert dead["metadata"]["name"] == "kcp-kserve-classifiers-dead-letters"
    assert dead["spec"]["topic"] == "kcp-dead-letters", "the dead-letter sink writes bridge.kafka.deadLetterTopic"
    assert dead["spec"]["auth"]["secret"]["ref"]["name"] == "kafka-auth"
    assert dead["spec"]["bootstrapServers"] == ["kafka-0.kafka.svc:9093", "kafka-1.kafka.svc:9093"]
    for isvc in by_kind(objects, "InferenceService"):
        assert "logger" not in isvc["spec"]["predictor"], "results are the bridge's, not KServe's inference logger's"
        kserve = kserve_container(objects, isvc)
        assert any(e["name"] == "KCP_API_KEY" for e in kserve["env"]), "the API key stays on in knative mode"
    assert not by_kind(objects, "ClusterRole"), "the sink is a plain Service: no addressable-resolver role"
    isvcs = {i["metadata"]["name"]: i for i in by_kind(objects, "InferenceService")}
    assert isvcs["iris"]["spec"]["predictor"]["minReplicas"] == 0


def test_knative_retries_and_dead_letters_follow_the_values():
    objects = helm_template([VALUES_DIR / "knative-kafkasource.yaml"], {
        "bridge.knative.retry": "6", "bridge.knative.backoffDelay": "PT2S", "bridge.knative.timeout": "",
        "bridge.knative.deadLetterSink": "false", "bridge.knative.ordering": "ordered",
        "bridge.knative.messageDeadlineSeconds": "50"})
    (source,) = by_kind(objects, "KafkaSource")
    assert source["spec"]["delivery"] == {"retry": 6, "backoffPolicy": "exponential", "backoffDelay": "PT2S"}
    assert source["spec"]["ordering"] == "ordered"
    assert not by_kind(objects, "KafkaSink")
    (dep,) = by_kind(objects, "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KCP_BRIDGE_MESSAGE_DEADLINE_S"] == "50"
    # a timeout in minutes is checked too
    helm_template([VALUES_DIR / "knative-kafkasource.yaml"], {"bridge.knative.timeout": "PT1M",
                                                               "bridge.knative.messageDeadlineSeconds": "50"})
    too_short = {"bridge.knative.timeout": "PT1M", "bridge.knative.messageDeadlineSeconds": "58"}
    proc = helm_template_text([VALUES_DIR / "knative-kafkasource.yaml"], too_short, check=False)
    assert proc.returncode != 0 and "must exceed messageDeadlineSeconds" in proc.stderr


def test_bridge_deployment_targets_the_chosen_inference_service():
    (dep,) = by_kind(helm_template(), "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    # no bridge.model: each request goes to the InferenceService named like its model
    assert args[args.index("--grpc-target") + 1] == "{model}-predictor.classifiers.svc.cluster.local:8081"
    (dep,) = by_kind(helm_template([VALUES_DIR / "multi-model.yaml"]), "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--rest-url") + 1] == "http://iris-predictor.classifiers.svc.cluster.local"
    assert dep["spec"]["replicas"] == 2
    (dep,) = by_kind(helm_template([VALUES_DIR / "knative-grpc.yaml"]), "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--grpc-target") + 1] == "mnist-predictor.classifiers.svc.cluster.local:80"


@pytest.mark.parametrize("values_file", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_values_are_rejected_with_a_clear_message(values_file):
    """``# schema: <msg>``: values.schema.json refuses it (install, template and lint);
    ``# fail: <msg>``: a cross-field check in _helpers.tpl does (install and template; helm lint only logs it)."""
    first = values_file.read_text().splitlines()[0]
    kind, _, expected = first.removeprefix("# ").partition(": ")
    assert kind in ("schema", "fail") and expected, f"{values_file.name}: first line must be '# schema|fail: <message>'"
    for command in ("template", "lint") if kind == "schema" else ("template",):
        args = ["kcp", str(CHART)] if command == "template" else [str(CHART)]
        proc = run([tool("helm"), command, *args, "-f", str(values_file)], check=False)
        assert proc.returncode != 0, f"helm {command} accepted {values_file.name}"
        assert expected in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_manifests_are_generated_from_the_chart_and_up_to_date():
    tool("helm")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "render-manifests.sh"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"manifests/, the dashboard copy or the values table is stale:\n{proc.stderr[-4000:]}"
    objects = [d for d in yaml.safe_load_all((REPO / "manifests" / "kserve-classifiers.yaml").read_text()) if d]
    assert {o["kind"] for o in objects} >= {"InferenceService", "Deployment", "ConfigMap"}
    assert not by_kind(objects, "Secret"), "no generated key is checked in: the API key Secret is created by the user"
    assert not by_kind(objects, "Pod"), "no helm test Pod in plain manifests"


def test_readme_values_table_is_generated_and_up_to_date(tmp_path):
    """The chart README's values table comes from values.yaml and values.schema.json; a stale one fails."""
    script = REPO / "scripts" / "helm-values-table.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"stale values table: run scripts/helm-values-table.py\n{proc.stderr[-3000:]}"
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in ("runtimes.scope", "kserve.clusterLocal", "prometheusRule.canaryWorse.z", "models",
                "feedback.database.allowSqliteWithReplicas", "predictor.terminationGracePeriodSeconds"):
        assert f"| `{key}` |" in readme, key
    assert values["predictor"]["terminationGracePeriodSeconds"] == 90
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace("| `runtimes.scope` |", "| `runtimes.scopes` |"))
    proc = subprocess.run([sys.executable, str(script), "--check", "--readme", str(stale)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "stale" in proc.stderr, "an edited table is caught"


def test_chart_metadata_and_readme_sections():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = "https://github.com/kserve-classifiers/kserve-classifiers"
    assert chart["home"] == project and project in chart["sources"]
    assert "example.invalid" not in (CHART / "Chart.yaml").read_text()
    headings = re.findall(r"^## (.+)$", (CHART / "README.md").read_text(), flags=re.M)
    for section in ("Install", "Upgrade", "Canary rollout (roll out a new model version)", "Alerts", "helm test",
                    "Uninstall", "Values"):
        assert section in headings, section
    proc = run([tool("helm"), "show", "readme", str(CHART)])
    assert proc.stdout.startswith("# kserve-classifiers"), "the README ships with the chart"


def test_notes_render_with_the_model_urls():
    proc = run([tool("helm"), "install", "kcp", str(CHART), "--dry-run=client", "--namespace", "classifiers",
                "-f", str(VALUES_DIR / "multi-model.yaml")])
    assert "kubectl -n classifiers wait --for=condition=Ready inferenceservice iris mnist fashion-mnist" in proc.stdout
    assert "/v2/models/iris/infer" in proc.stdout
    defaults = run([tool("helm"), "install", "kcp", str(CHART), "--dry-run=client", "--namespace", "classifiers",
                    "--set", "models[0].name=iris", "--set", "models[0].format=sklearn",
                    "--set", "models[0].storageUri=pvc://m/iris", "--set", "models[0].maxReplicas=3",
                    "--set", "feedback.database.allowSqliteWithReplicas=true"])
    assert "WARNING: the feedback database is SQLite" in defaults.stdout


# --- hardening: NetworkPolicy, PodDisruptionBudgets, service account tokens, image digests ---------------------


def predictor_pod(isvc: dict) -> Pod:
    """A predictor pod of ``isvc`` as KServe creates it: the labels the chart puts on the predictor."""
    return Pod("classifiers", isvc["spec"]["predictor"]["labels"])


BRIDGE = Pod("classifiers", {"app.kubernetes.io/name": "kserve-classifiers", "app.kubernetes.io/instance": "kcp",
                             "app.kubernetes.io/component": "bridge"})
HELM_TEST = Pod("classifiers", {**BRIDGE.labels, "app.kubernetes.io/component": "test"})
STRANGER = Pod("classifiers", {"app": "something-else"})
PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
DISPATCHER = Pod("knative-eventing", {"app": "kafka-source-dispatcher"})
KUBE_DNS = Pod("kube-system", {"k8s-app": "kube-dns"})


def reach(objects: list[dict], other: Pod, port: int, direction: str = "Ingress", protocol: str = "TCP") -> bool:
    """Whether every predictor pod accepts from / may reach ``other`` on ``port``."""
    policies = by_kind(objects, "NetworkPolicy")
    results = {allowed(policies, predictor_pod(i), other, port, direction=direction, protocol=protocol)
               for i in by_kind(objects, "InferenceService")}
    assert len(results) == 1, "the models' pods must be treated alike"
    return results.pop()


def test_network_policy_admits_only_the_bridge_the_test_pod_and_prometheus():
    objects = helm_template()
    (policy,) = [p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("-predictor")]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert reach(objects, BRIDGE, 8081) and reach(objects, BRIDGE, 8080)
    assert reach(objects, HELM_TEST, 8080)
    assert not reach(objects, BRIDGE, 9999), "only the predictor's ports"
    assert not reach(objects, STRANGER, 8080), "another pod of the namespace"
    assert not reach(objects, Pod("default", BRIDGE.labels), 8080), "a bridge-labelled pod of another namespace"
    assert reach(objects, PROMETHEUS, 8080) and not reach(objects, PROMETHEUS, 8081), "Prometheus: /metrics only"
    assert not reach(objects, DISPATCHER, 8080), "no KafkaSource in deployment mode"
    policies = by_kind(objects, "NetworkPolicy")
    assert allowed(policies, HELM_TEST, STRANGER, 8090, direction="Ingress"), "the policies select only their pods"


def test_bridge_metrics_port_only_for_prometheus():
    """The bridge listens on all addresses for /metrics and its probes: only Prometheus may reach it."""
    policies = by_kind(helm_template(), "NetworkPolicy")
    assert allowed(policies, BRIDGE, PROMETHEUS, 8090, direction="Ingress")
    assert not allowed(policies, BRIDGE, STRANGER, 8090, direction="Ingress")
    assert not allowed(policies, BRIDGE, Pod("default", {"any": "pod"}), 8090, direction="Ingress")
    assert allowed(policies, BRIDGE, Pod(ip="10.0.0.9"), 9092, direction="Egress"), "Kafka may be anywhere"
    closed = by_kind(helm_template(set_values={"networkPolicy.ingress.prometheus.enabled": "false"}), "NetworkPolicy")
    assert not allowed(closed, BRIDGE, PROMETHEUS, 8090, direction="Ingress")
    knative = by_kind(helm_template([VALUES_DIR / "knative-kafkasource.yaml"]), "NetworkPolicy")
    assert allowed(knative, BRIDGE, PROMETHEUS, 8090, direction="Ingress")
    assert allowed(knative, BRIDGE, DISPATCHER, 8080, direction="Ingress"), "the KafkaSource delivers to the receiver"
    assert not allowed(knative, BRIDGE, DISPATCHER, 8090, direction="Ingress")
    assert not allowed(knative, BRIDGE, STRANGER, 8080, direction="Ingress"), "the receiver: the dispatcher only"
    assert not allowed(knative, BRIDGE, Pod("knative-eventing", {"app": "kafka-broker-receiver"}), 8080,
                       direction="Ingress")
    assert not allowed(knative, BRIDGE, PROMETHEUS, 8080, direction="Ingress")
    assert not allowed(by_kind(helm_template(), "NetworkPolicy"), BRIDGE, DISPATCHER, 8080, direction="Ingress"), \
        "deployment mode: no receiver to reach"


def test_knative_bridge_starts_at_earliest_by_default():
    """Both bridge modes start a new consumer group at the earliest offset: nothing sent before it started is lost."""
    assert values_of(None)["bridge"]["knative"]["initialOffset"] == "earliest"
    (source,) = by_kind(helm_template([VALUES_DIR / "knative-kafkasource.yaml"]), "KafkaSource")
    assert source["spec"]["initialOffset"] == "earliest"
    latest = helm_template([VALUES_DIR / "knative-kafkasource.yaml"], {"bridge.knative.initialOffset": "latest"})
    assert by_kind(latest, "KafkaSource")[0]["spec"]["initialOffset"] == "latest"


def test_network_policy_egress_dns_and_url_input_only_by_default():
    objects = helm_template()
    assert reach(objects, KUBE_DNS, 53, "Egress", "UDP") and reach(objects, KUBE_DNS, 53, "Egress", "TCP")
    assert not reach(objects, Pod("kube-system", {"k8s-app": "other"}), 53, "Egress", "UDP")
    assert reach(objects, Pod(ip="93.184.216.34"), 443, "Egress"), "URL input on: public addresses"
    assert reach(objects, Pod(ip="2606:2800:220:1::1"), 80, "Egress")
    for private in ("10.0.0.5", "172.20.1.1", "192.168.1.1", "169.254.169.254", "127.0.0.1", "fd00::1", "fe80::1"):
        assert not reach(objects, Pod(ip=private), 443, "Egress"), private
    assert not reach(objects, Pod(ip="10.0.0.5"), 5432, "Egress"), "no database configured: SQLite in the pod"
    assert not reach(objects, STRANGER, 8080, "Egress")

    off = helm_template(set_values={"predictor.urlInput.enabled": "false"})
    assert not reach(off, Pod(ip="93.184.216.34"), 443, "Egress"), "URL input off, pvc:// models: no internet"
    assert reach(off, KUBE_DNS, 53, "Egress", "UDP")
    (isvc,) = by_kind(off, "InferenceService")
    env = {e["name"]: e.get("value") for e in kserve_container(off, isvc)["env"]}
    assert env["KCP_URL_FETCH_ENABLED"] == "false"


def test_network_policy_egress_database_downloads_and_allowed_networks():
    objects = helm_template([VALUES_DIR / "postgresql.yaml"], {"predictor.urlInput.enabled": "false"})
    assert reach(objects, Pod(ip="10.1.2.3"), 5432, "Egress"), "the feedback database"
    assert not reach(objects, Pod(ip="10.1.2.3"), 5433, "Egress")
    multi = helm_template([VALUES_DIR / "multi-model.yaml"], {"predictor.urlInput.enabled": "false"})
    assert reach(multi, Pod(ip="52.216.0.10"), 443, "Egress"), "s3:// and gs:// models are downloaded"
    assert not reach(multi, Pod(ip="52.216.0.10"), 80, "Egress") and not reach(multi, Pod(ip="10.0.0.9"), 443, "Egress")
    opened = helm_template([VALUES_DIR / "network-open.yaml"])
    assert reach(opened, Pod(ip="10.20.3.4"), 8443, "Egress"), "predictor.urlInput.allowedNetworks"
    assert reach(opened, Pod("db", {"app": "postgres"}), 5432, "Egress"), "feedbackDatabase.to"
    assert not reach(opened, Pod(ip="10.1.2.3"), 5432, "Egress"), "only the listed database peers"
    assert reach(opened, Pod(ip="10.30.0.7"), 9000, "Egress"), "egress.extra (an in-cluster object store)"
    (isvc, *_) = by_kind(opened, "InferenceService")
    env = {e["name"]: e.get("value") for e in kserve_container(opened, isvc)["env"]}
    assert env["KCP_URL_ALLOWED_NETWORKS"] == "10.20.0.0/16"


def test_network_policy_opens_to_listed_namespaces_and_knative():
    opened = helm_template([VALUES_DIR / "network-open.yaml"])
    assert reach(opened, Pod("ingress-nginx", {"any": "pod"}), 8080), "networkPolicy.ingress.namespaces"
    assert not reach(opened, Pod("elsewhere", {"any": "pod"}), 8080)
    assert not reach(opened, PROMETHEUS, 8080), "prometheus.enabled=false"
    assert reach(opened, Pod("monitoring", {"app": "grafana-agent"}), 8080), "ingress.extra"
    source = helm_template([VALUES_DIR / "knative-kafkasource.yaml"], {"kserve.deploymentMode": "Standard",
                                                                         "models[0].minReplicas": "1",
                                                                         "models[0].autoscaling.scaleMetric": "cpu",
                                                                         "models[1].minReplicas": "1",
                                                                         "models[1].autoscaling.scaleMetric": "cpu"})
    assert reach(source, BRIDGE, 8080), "the bridge calls the models in knative mode too"
    assert not reach(source, DISPATCHER, 8080), "the KafkaSource delivers to the bridge, never to the models"
    assert not reach(source, Pod("knative-eventing", {"app": "kafka-sink-receiver"}), 8080, "Egress"), \
        "no inference logger: the bridge writes the results"
    serverless = helm_template([VALUES_DIR / "knative-kafkasource.yaml"])
    assert reach(serverless, Pod("knative-serving", {"app": "activator"}), 8012), "Knative: via the activator"
    assert reach(serverless, Pod("istio-system", {"app": "knative-local-gateway"}), 8013)
    assert not reach(serverless, Pod("istio-system", {"app": "istio-ingressgateway"}), 15000), \
        "the Knative namespaces reach the queue-proxy's ports only"
    assert not reach(serverless, Pod("kourier-system", {"app": "3scale-kourier-gateway"}), 8081)
    assert not reach(serverless, STRANGER, 8012)
    assert not by_kind(helm_template(set_values={"networkPolicy.enabled": "false"}), "NetworkPolicy")


def test_pod_disruption_budgets_for_models_with_more_than_one_replica():
    objects = helm_template([VALUES_DIR / "multi-model.yaml"])
    pdbs = {p["metadata"]["name"]: p for p in by_kind(objects, "PodDisruptionBudget")}
    assert set(pdbs) == {"kcp-kserve-classifiers-iris-predictor", "kcp-kserve-classifiers-mnist-predictor",
                         "kcp-kserve-classifiers-fashion-mnist-predictor", "kcp-kserve-classifiers-bridge"}
    for isvc in by_kind(objects, "InferenceService"):
        pdb = pdbs[f"kcp-kserve-classifiers-{isvc['metadata']['name']}-predictor"]
        assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
        for other in by_kind(objects, "InferenceService"):
            assert selects(pdb["spec"]["selector"], predictor_pod(other).labels) == (other is isvc), \
                "each budget covers exactly its own model's pods"
    (bridge,) = by_kind(objects, "Deployment")
    assert selects(pdbs["kcp-kserve-classifiers-bridge"]["spec"]["selector"],
                   bridge["spec"]["template"]["metadata"]["labels"])
    assert not by_kind(helm_template(), "PodDisruptionBudget"), "defaults: one replica, one bridge: no budget"
    scaled = helm_template([VALUES_DIR / "postgresql.yaml"])
    assert len(by_kind(scaled, "PodDisruptionBudget")) == 1, "iris scales to 8"
    assert not by_kind(helm_template([VALUES_DIR / "postgresql.yaml"], {"podDisruptionBudget.enabled": "false"}),
                       "PodDisruptionBudget")


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    """Every pod spec the chart renders (InferenceService predictors, Deployments, helm test Pods)."""
    specs = [(f"InferenceService/{o['metadata']['name']}", o["spec"]["predictor"])
             for o in by_kind(objects, "InferenceService")]
    specs += [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]) for o in runtimes(objects).values()]
    specs += [(f"Deployment/{o['metadata']['name']}", o["spec"]["template"]["spec"])
              for o in by_kind(objects, "Deployment")]
    return specs + [(f"Pod/{o['metadata']['name']}", o["spec"]) for o in by_kind(objects, "Pod")]


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=ids(VALUE_SETS))
def test_no_pod_gets_a_service_account_token(values_file):
    specs = pod_specs(render(values_file))
    assert specs
    for where, spec in specs:
        if where.split("/")[0] in RUNTIME_KINDS:
            continue  # a runtime is not a pod: the InferenceService's predictor sets it for the pod
        assert spec.get("automountServiceAccountToken") is False, where


def test_image_digests_pin_the_images():
    predictor = "sha256:" + "a" * 64
    bridge = "sha256:" + "b" * 64
    sklearn = "sha256:" + "c" * 64
    objects = helm_template(set_values={"runtimes.keras.image.digest": predictor,
                                        "runtimes.sklearn.image.digest": sklearn,
                                        "bridge.deployment.image.digest": bridge})
    images = {where: [c["image"] for c in spec.get("containers", [])] for where, spec in pod_specs(objects)
              if where.split("/")[0] != "InferenceService"}
    repo = "ghcr.io/example/kserve-classifiers"
    assert images == {"ServingRuntime/kcp-kserve-classifiers-sklearn": [f"{repo}-sklearn@{sklearn}"],
                      "ServingRuntime/kcp-kserve-classifiers-keras": [f"{repo}-predictor@{predictor}"],
                      "ServingRuntime/kcp-kserve-classifiers-katonic": [f"{repo}-predictor:0.1.0"],
                      "Deployment/kcp-kserve-classifiers-bridge": [f"{repo}-bridge@{bridge}"],
                      "Pod/kcp-kserve-classifiers-test-iris": [f"{repo}-bridge@{bridge}"]}
    tagged = {c["image"] for _, spec in pod_specs(helm_template()) for c in spec.get("containers", [])}
    assert tagged == {f"{repo}-sklearn:0.1.0", f"{repo}-predictor:0.1.0", f"{repo}-bridge:0.1.0"}


def test_generated_api_key_is_kept_across_renders_against_the_cluster(tmp_path):
    """`lookup`: with the release's Secret in the cluster, every render (helm upgrade, helm template --dry-run=server)
    carries its key on; without one, a fresh random key. Rendered by real helm against a loopback core/v1 API
    holding the Secret, from a copy of the chart with only the API key template (the API serves Secrets only)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("tests", "dashboards", "files"))
    for template in (chart / "templates").iterdir():
        if template.name not in ("_helpers.tpl", "secret-apikey.yaml"):
            template.unlink()
    name = "kcp-kserve-classifiers-api-key"

    def key(kubeconfig: Path, *extra: str) -> str:
        proc = run([tool("helm"), "template", "kcp", str(chart), "--namespace", "classifiers", "--dry-run=server",
                    "--disable-openapi-validation", "--kubeconfig", str(kubeconfig), *extra])
        (secret,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert secret["metadata"]["name"] == name
        return base64.b64decode(secret["data"]["api-key"]).decode()

    with secrets_api([], tmp_path) as empty:
        first, second = key(empty), key(empty)
    assert re.fullmatch(r"[A-Za-z0-9]{40}", first) and first != second, "no Secret yet: a new random key"
    installed = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": {"api-key": base64.b64encode(
        first.encode()).decode()}, "metadata": {
        "name": name, "namespace": "classifiers", "labels": {"app.kubernetes.io/managed-by": "Helm"},
        "annotations": {"meta.helm.sh/release-name": "kcp", "meta.helm.sh/release-namespace": "classifiers"}}}
    with secrets_api([installed], tmp_path) as cluster:
        assert key(cluster) == first and key(cluster) == first, "the installed key is carried on"
        assert key(cluster, "--set", "apiKey.value=rotated") == "rotated", "an explicit apiKey.value wins"
