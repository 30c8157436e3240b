"""Every rendered object is valid for the cluster, and every command it runs is accepted by the real CLI.

* Schemas: built-in kinds with kubernetes-validate (strict), InferenceService / ServingRuntime / KafkaSource /
  KafkaSink against the openAPIV3Schema of the CRDs in ../shared/crds (unknown fields are errors),
  ClusterServingRuntime against the ServingRuntime schema (KServe generates both CRDs from one Go type, and
  ../shared/crds holds the namespaced one), ServiceMonitor and PrometheusRule by local schemas (the rules'
  PromQL itself is checked by promtool in tests/test_alert_rules.py).
* The real API server: the custom resources are server-side dry-run applied to the upstream
  apiextensions-apiserver with the CRDs installed (CEL rules, pruning, defaulting, field ownership).
* The real CLIs: the container KServe would run (the serving runtime's, merged with the InferenceService's
  predictor.model) parses with ``python -m predictors``'s parser and, with host/ports swapped for loopback and
  free ports and /mnt/models for one trained package directory (what KServe's storage initializer delivers),
  starts a server that becomes ready; the bridge's parse with ``python -m streaming``'s parser and land, with
  the env, in the bridge's settings.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fixtures.k8s import (
    REPO,
    VALUES_DIR,
    by_kind,
    crd_dir,
    crd_root_schema,
    crd_schemas,
    crd_to_jsonschema,
    helm_template,
    load_yaml_documents,
)
from tests.fixtures.ports import free_port, port_open, wait_for
from tests.fixtures.server import ServerHandle, start_model_server
from tests.test_helm import kserve_container

VALUE_SETS = [None, *sorted(VALUES_DIR.glob("*.yaml"))]
IDS = [p.stem if p else "defaults" for p in VALUE_SETS]
MANIFESTS = REPO / "manifests" / "kserve-classifiers.yaml"


def render(values_file) -> list[dict]:
    return helm_template([values_file] if values_file else [])


# --- schemas ---------------------------------------------------------------------------------------------

SERVING_RUNTIME = ("serving.kserve.io/v1alpha1", "ServingRuntime")
CLUSTER_SERVING_RUNTIME = ("serving.kserve.io/v1alpha1", "ClusterServingRuntime")
PROMETHEUS_RULE = ("monitoring.coreos.com/v1", "PrometheusRule")

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_RULE = {
    "type": "object", "additionalProperties": False, "required": ["expr"],
    "properties": {"record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                   "alert": {"type": "string", "minLength": 1},
                   "expr": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer"}]},
                   "for": {"type": "string"}, "keep_firing_for": {"type": "string"},
                   "labels": _LABELS, "annotations": _LABELS},
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": PROMETHEUS_RULE[0]}, "kind": {"const": PROMETHEUS_RULE[1]},
        "metadata": {"type": "object"},
        "spec": {"type": "object", "additionalProperties": False, "properties": {"groups": {
            "type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": {"type": "string"},
                               "query_offset": {"type": "string"}, "limit": {"type": "integer"},
                               "labels": _LABELS, "partial_response_strategy": {"type": "string"},
                               "rules": {"type": "array", "items": _RULE}}}}}},
    },
}
"""The PrometheusRule fields of prometheus-operator's CRD that the chart may use (no CRD of it in ../shared/crds)."""


def cluster_serving_runtime_crd() -> dict:
    """KServe's ClusterServingRuntime CRD: the ServingRuntime CRD of ../shared/crds, cluster-scoped. KServe generates
    both from the same Go type (ServingRuntimeSpec), so the schema is the same; only the names and scope differ."""
    (crd,) = [d for d in load_yaml_documents(crd_dir() / "serving.kserve.io_servingruntimes.yaml")
              if d.get("kind") == "CustomResourceDefinition"]
    crd = copy.deepcopy(crd)
    crd.pop("status", None)
    crd["metadata"] = {"name": "clusterservingruntimes.serving.kserve.io",
                       "annotations": crd["metadata"].get("annotations", {})}
    crd["spec"]["scope"] = "Cluster"
    crd["spec"]["names"] = {"kind": "ClusterServingRuntime", "listKind": "ClusterServingRuntimeList",
                            "plural": "clusterservingruntimes", "singular": "clusterservingruntime"}
    return crd


def schema_problems(validator, obj: dict) -> list[str]:
    """``validator.errors`` for every kind the chart renders, the two without a CRD in ../shared/crds included."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key == CLUSTER_SERVING_RUNTIME:
        assert "namespace" not in obj["metadata"], "a ClusterServingRuntime is cluster-scoped"
        as_namespaced = {**obj, "kind": "ServingRuntime", "metadata": {**obj["metadata"], "namespace": "any"}}
        return [p.replace("ServingRuntime/", "ClusterServingRuntime/", 1) for p in validator.errors(as_namespaced)]
    if key == PROMETHEUS_RULE:
        import jsonschema

        name = obj["metadata"].get("name", "?")
        # The name and ObjectMeta through the built-in schemas (a ConfigMap has nothing else that is required).
        problems = [p.replace("ConfigMap/", "PrometheusRule/", 1) for p in validator.errors(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})]
        checker = jsonschema.Draft202012Validator(PROMETHEUS_RULE_SCHEMA)
        problems += [f"PrometheusRule/{name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                     for e in checker.iter_errors(obj)]
        return problems
    return validator.errors(obj)


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_every_rendered_object_matches_its_schema(values_file, schema_validator):
    objects = render(values_file)
    assert objects
    problems = [p for obj in objects for p in schema_problems(schema_validator, obj)]
    assert not problems, "\n".join(problems)


def test_checked_in_manifests_match_their_schemas(schema_validator):
    objects = [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]
    problems = [p for obj in objects for p in schema_problems(schema_validator, obj)]
    assert not problems, "\n".join(problems)


def test_the_extra_schemas_reject_what_the_cluster_would(schema_validator):
    objects = render(VALUES_DIR / "multi-model.yaml") + render(VALUES_DIR / "canary.yaml")
    (runtime, *_) = [o for o in objects if (o["apiVersion"], o["kind"]) == CLUSTER_SERVING_RUNTIME]
    (rule,) = [o for o in objects if (o["apiVersion"], o["kind"]) == PROMETHEUS_RULE]
    assert not schema_problems(schema_validator, runtime) and not schema_problems(schema_validator, rule)
    bad = copy.deepcopy(runtime)
    bad["spec"]["supportedModelFormats"][0]["autoselect"] = False
    assert any("'autoselect' was unexpected" in p for p in schema_problems(schema_validator, bad))
    bad = copy.deepcopy(rule)
    bad["spec"]["groups"][0]["rules"][0]["exprr"] = "up"
    assert any("'exprr' was unexpected" in p for p in schema_problems(schema_validator, bad))
    bad = copy.deepcopy(rule)
    bad["metadata"]["name"] = "Rules_1"
    assert any("not a DNS-1123 subdomain" in p for p in schema_problems(schema_validator, bad))


def test_the_validator_rejects_what_the_cluster_would(schema_validator):
    (isvc,) = by_kind(render(None), "InferenceService")
    (bridge,) = by_kind(render(None), "Deployment")
    cases = []
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["model"]["portz"] = []
    cases.append((bad, "'portz' was unexpected"))
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["scaleMetric"] = "gpu"
    cases.append((bad, "'gpu' is not one of"))
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["model"]["resources"]["limits"]["cpu"] = "two"
    cases.append((bad, "does not match"))
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["minReplicas"] = "1"
    cases.append((bad, "is not of type 'integer'"))
    bad = copy.deepcopy(isvc)
    bad["metadata"]["labelz"] = {}
    cases.append((bad, "'labelz' was unexpected"))
    bad = copy.deepcopy(bridge)
    bad["spec"]["template"]["spec"]["containers"][0]["envv"] = []
    cases.append((bad, "'envv' was unexpected"))
    bad = copy.deepcopy(bridge)
    bad["metadata"]["name"] = "Bridge_1"
    cases.append((bad, "not a DNS-1123 subdomain"))
    for obj, message in cases:
        errors = schema_validator.errors(obj)
        assert any(message in e for e in errors), (message, errors)


def test_kubernetes_validate_works_offline(monkeypatch):
    """Built-in schemas ship inside kubernetes-validate: validating must not touch the network."""
    import socket

    import kubernetes_validate

    def no_network(*args, **kwargs):
        raise AssertionError("kubernetes-validate tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    (deployment,) = by_kind(render(None), "Deployment")
    assert kubernetes_validate.validate(deployment, "1.36.0", strict=True) == "1.36"
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.36.0", strict=True)


def test_crd_converter_semantics():
    node = {
        "type": "object",
        "properties": {
            "plain": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "map": {"type": "object", "additionalProperties": {"type": "integer"}},
            "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "maybe": {"type": "string", "nullable": True, "enum": ["x"]},
            "ratio": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
            "either": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                       "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
            "embedded": {"type": "object", "x-kubernetes-embedded-resource": True,
                         "properties": {"spec": {"type": "object"}}},
        },
    }
    import jsonschema

    validator = jsonschema.Draft202012Validator(crd_to_jsonschema(node))

    def ok(value):
        return not list(validator.iter_errors(value))

    assert ok({"plain": {"a": "x"}, "open": {"anything": {"goes": 1}}, "map": {"k": 1}, "port": 8080})
    assert ok({"port": "http", "maybe": None, "ratio": 0.5, "either": {"a": "x"}})
    assert ok({"embedded": {"apiVersion": "v1", "kind": "ConfigMap", "spec": {}}})
    assert not ok({"plain": {"b": "x"}}), "undeclared field under a structural object"
    assert not ok({"unknown": 1}), "undeclared field at the top"
    assert not ok({"map": {"k": "1"}})
    assert not ok({"port": 1.5})
    assert not ok({"maybe": "y"})
    assert not ok({"ratio": 0})
    assert not ok({"either": {}})
    assert not ok({"embedded": {"spec": {"x": 1}}}), "embedded spec is still structural"


def test_every_crd_version_converts():
    schemas = crd_schemas()
    assert {("serving.kserve.io/v1beta1", "InferenceService"), ("sources.knative.dev/v1beta1", "KafkaSource"),
            ("sources.knative.dev/v1", "KafkaSource"), ("eventing.knative.dev/v1alpha1", "KafkaSink")} <= set(schemas)
    (crd,) = [d for d in load_yaml_documents(crd_dir() / "eventing.knative.dev_kafkasinks.yaml")
              if d.get("kind") == "CustomResourceDefinition"]
    schema = crd_root_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "eventing.knative.dev",
                             "v1alpha1", "KafkaSink")
    assert schema["properties"]["apiVersion"] == {"const": "eventing.knative.dev/v1alpha1"}
    assert schema["properties"]["spec"]["additionalProperties"] is False


# --- the real API server -----------------------------------------------------------------------------------


def custom_resources(objects: list[dict]) -> list[dict]:
    kinds = {*crd_schemas(), CLUSTER_SERVING_RUNTIME}
    return [o for o in objects if (o["apiVersion"], o["kind"]) in kinds]


@pytest.fixture(scope="module")
def kserve_apiserver(crd_apiserver):
    """The session's CRD API server with KServe's runtime CRDs installed too: ServingRuntime from ../shared/crds and
    ClusterServingRuntime derived from it (:func:`cluster_serving_runtime_crd`)."""
    docs = [d for d in load_yaml_documents(crd_dir() / "serving.kserve.io_servingruntimes.yaml")
            if d.get("kind") == "CustomResourceDefinition"]
    docs.append(cluster_serving_runtime_crd())
    crd_apiserver.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs), timeout=120)
    wanted = {"servingruntimes.serving.kserve.io", "clusterservingruntimes.serving.kserve.io"}
    wait_for(lambda: wanted <= set(crd_apiserver.kubectl("api-resources", "-o", "name", check=False).stdout.split()),
             timeout=60, what="the serving runtime CRDs in discovery")
    return crd_apiserver


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_custom_resources_pass_server_side_dry_run_apply(values_file, kserve_apiserver):
    resources = custom_resources(render(values_file))
    assert resources
    kinds = {o["kind"] for o in resources}
    assert kinds & {"ServingRuntime", "ClusterServingRuntime"}, "every value set renders its serving runtimes"
    proc = kserve_apiserver.kubectl("apply", "--server-side", "--dry-run=server", "--field-manager=helm",
                                 "--validate=strict", "-f", "-", input=yaml.safe_dump_all(resources), check=False)
    assert proc.returncode == 0, proc.stderr
    for obj in resources:
        assert f"{obj['metadata']['name']} serverside-applied (server dry run)" in proc.stdout


def test_api_server_rejects_an_unknown_field(kserve_apiserver):
    (isvc,) = by_kind(render(None), "InferenceService")
    isvc["spec"]["predictor"]["model"]["bogus"] = True
    proc = kserve_apiserver.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=yaml.safe_dump(isvc),
                                    check=False)
    assert proc.returncode != 0
    assert "bogus: field not declared in schema" in proc.stderr
    runtime = next(o for o in render(VALUES_DIR / "multi-model.yaml") if o["kind"] == "ClusterServingRuntime")
    runtime["spec"]["supportedModelFormats"][0]["autoselect"] = False
    proc = kserve_apiserver.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-",
                                    input=yaml.safe_dump(runtime), check=False)
    assert proc.returncode != 0 and "autoselect: field not declared in schema" in proc.stderr


# --- the rendered commands against the real command-line parsers ---------------------------------------------


def predictor_containers(objects: list[dict]) -> list[dict]:
    """The container KServe runs for each InferenceService: its runtime's, merged with its predictor.model."""
    return [kserve_container(objects, isvc) for isvc in by_kind(objects, "InferenceService")]


def bridge_containers(objects: list[dict]) -> list[dict]:
    return [c for dep in by_kind(objects, "Deployment") for c in dep["spec"]["template"]["spec"]["containers"]
            if c["name"] == "bridge"]


def parse_predictor(command: list[str], args: list[str]):
    assert command[:3] == ["python", "-m", "predictors"], command
    from predictors.__main__ import build_parser

    return build_parser().parse_args([*command[3:], *args])


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_predictor_args_are_accepted_by_the_server_cli(values_file):
    for container in predictor_containers(render(values_file)):
        ns = parse_predictor(container["command"], container["args"])
        assert ns.command == "serve"
        assert ns.model_dir == "/mnt/models"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if "http1" in ports:
            assert ns.http_port == ports["http1"]
        if "h2c" in ports:
            assert ns.grpc_port == ports["h2c"]
            assert ns.enable_grpc is True
        else:
            assert ns.enable_grpc is False, "no gRPC port declared: do not serve gRPC"


def env_values(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_bridge_args_and_env_reach_the_bridge_settings(values_file, monkeypatch):
    """The rendered command line and env, through the bridge's own parser and settings, give what was asked."""
    import streaming.__main__ as streaming_cli
    import streaming.bridge

    values_objects = render(values_file)
    for container in bridge_containers(values_objects):
        assert container["command"] == ["python", "-m", "streaming", "bridge"]
        captured: dict = {}
        monkeypatch.setattr(streaming.bridge, "run_bridge", lambda s, _c=captured: _c.setdefault("settings", s))
        for var in [v for v in os.environ if v.startswith("KCP_")]:
            monkeypatch.delenv(var)
        secrets = {}
        for e in container["env"]:
            if "value" in e:
                monkeypatch.setenv(e["name"], e["value"])
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                secrets[e["name"]] = f"{ref['name']}/{ref['key']}"
                monkeypatch.setenv(e["name"], secrets[e["name"]])
        args = streaming_cli.build_parser().parse_args([*container["command"][3:], *container["args"]])
        assert streaming_cli.cmd_bridge(args) == 0
        s = captured["settings"]
        arg = dict(zip(container["args"][::2], container["args"][1::2], strict=False))
        assert s.backend == "kafka"
        assert s.request_topic == arg["--request-topic"] and s.result_topic == arg["--result-topic"]
        assert s.dead_letter_topic == arg["--dead-letter-topic"]
        if "--source" in arg:  # knative mode: the KafkaSource's deliveries, on the port its Service targets
            assert (s.source, s.http_host) == ("http", "0.0.0.0")
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert s.http_port == ports["http"]
            assert s.message_deadline_s == float(env_values(container)["KCP_BRIDGE_MESSAGE_DEADLINE_S"])
        else:
            assert s.source == "broker" and s.group == arg["--group"]
        assert s.kafka.bootstrap_servers == arg["--bootstrap-servers"]
        assert s.v2.protocol == arg["--protocol"]
        if s.v2.protocol == "grpc":
            assert s.v2.grpc_target == arg["--grpc-target"]
        else:
            assert s.v2.rest_url == arg["--rest-url"]
        assert (s.health_host, s.health_port) == ("0.0.0.0", 8090)
        env = {e["name"]: e for e in container["env"]}
        assert s.kafka.security_protocol == env["KCP_KAFKA_SECURITY_PROTOCOL"]["value"]
        if "KCP_V2_API_KEY" in secrets:
            assert s.v2.api_key.get_secret_value() == secrets["KCP_V2_API_KEY"]
        if "KCP_KAFKA_SASL_PLAIN_PASSWORD" in secrets:
            assert s.kafka.sasl_mechanism == secrets["KCP_KAFKA_SASL_MECHANISM"]
            assert s.kafka.sasl_plain_username == secrets["KCP_KAFKA_SASL_PLAIN_USERNAME"]
            assert s.kafka.sasl_plain_password.get_secret_value() == secrets["KCP_KAFKA_SASL_PLAIN_PASSWORD"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        if "KCP_KAFKA_SSL_CAFILE" in env:
            assert s.kafka.ssl_cafile == f"{mounts['kafka-tls']}/ca.crt"
        if "KCP_KAFKA_SSL_CERTFILE" in env:
            assert (s.kafka.ssl_certfile, s.kafka.ssl_keyfile) == (f"{mounts['kafka-tls']}/user.crt",
                                                                    f"{mounts['kafka-tls']}/user.key")
            (volume,) = [v for v in values_objects_volumes(container, values_objects) if v["name"] == "kafka-tls"]
            assert {i["key"] for i in volume["secret"]["items"]} == {"ca.crt", "user.crt", "user.key"}
        # every KCP_ variable the chart sets is one the settings know (a typo would be silently ignored)
        for name in env:
            assert _known_setting(name), f"{name} is not a streaming setting"
        probe_port = container["readinessProbe"]["httpGet"]["port"]
        assert probe_port == "metrics" and container["ports"][0]["containerPort"] == s.health_port


def values_objects_volumes(container: dict, objects: list[dict]) -> list[dict]:
    """The volumes of the Deployment that runs ``container``."""
    (dep,) = [d for d in by_kind(objects, "Deployment") if container in d["spec"]["template"]["spec"]["containers"]]
    return dep["spec"]["template"]["spec"]["volumes"]


def _known_setting(var: str) -> bool:
    from streaming.settings import BridgeSettings, KafkaSettings, V2ClientSettings

    known = (("KCP_KAFKA_", KafkaSettings), ("KCP_V2_", V2ClientSettings), ("KCP_BRIDGE_", BridgeSettings))
    for prefix, model in known:
        if var.startswith(prefix) and var.removeprefix(prefix).lower() in model.model_fields:
            return True
    return False


def _trained_models() -> Path:
    models = REPO / "models"
    if not any((p / "config.json").is_file() for p in models.glob("*")):
        pytest.skip("no trained packages in models/ (make train)")
    return models


def test_server_starts_with_the_rendered_args(tmp_path):
    """Start ``python -m predictors serve`` with exactly the args and env of the container KServe runs for the
    default InferenceService, only host and ports swapped for loopback and free ports, and /mnt/models for the one
    package directory KServe's storage initializer delivers there (models/iris); it must become ready on both
    ports and serve that package."""
    models = _trained_models()
    objects = render(None)
    (isvc,) = by_kind(objects, "InferenceService")
    container = kserve_container(objects, isvc)
    name = isvc["metadata"]["name"]
    model_dir = models / name
    assert (model_dir / "config.json").is_file(), f"the default model {name} is not among the trained packages"
    assert isvc["spec"]["predictor"]["model"]["storageUri"].endswith(f"/{name}"), "one package per storageUri"
    http_port, grpc_port = free_port(), free_port()
    swap = {"--host": "127.0.0.1", "--http_port": str(http_port), "--grpc_port": str(grpc_port),
            "--model_dir": str(model_dir)}
    args = list(container["args"])
    for flag, value in swap.items():
        args[args.index(flag) + 1] = value
    assert len(args) == len(container["args"])
    env = {**os.environ, "KCP_API_KEY": "rendered-args-test-key",
           "KCP_FEEDBACK_DB_URL": f"sqlite:///{tmp_path / 'feedback.db'}"}
    rendered_env = {e["name"] for e in container["env"]}
    assert {"KCP_API_KEY", "KCP_FEEDBACK_DB_URL", "KCP_URL_FETCH_ENABLED"} <= rendered_env
    env.update({e["name"]: e["value"] for e in container["env"]
                if "value" in e and e["name"] not in ("KCP_FEEDBACK_DB_URL",)})
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, *container["command"][1:], *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    handle = ServerHandle(proc, model_dir, http_port, grpc_port, "rendered-args-test-key", log_path)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{handle.log()[-4000:]}")
            return httpx.get(f"{handle.http_url}{container['readinessProbe']['httpGet']['path']}",
                             timeout=1).status_code == 200

        try:
            wait_for(ready, timeout=180, what="the server's readiness probe path")
        except AssertionError as exc:
            pytest.fail(str(exc))
        assert httpx.get(f"{handle.http_url}{container['livenessProbe']['httpGet']['path']}").status_code == 200
        assert port_open(grpc_port), "gRPC port declared in the InferenceService is not listening"
        assert httpx.get(f"{handle.http_url}/metrics").status_code == 200, "Prometheus scrapes without the key"
        assert httpx.get(f"{handle.http_url}/v2/models").status_code == 401, "the API key from the env is enforced"
        ready = httpx.get(f"{handle.http_url}/v2/models/{name}/ready", headers={"X-API-Key": "rendered-args-test-key"})
        assert ready.status_code == 200, "a single package directory as --model_dir serves that package"
    finally:
        handle.stop()


def run_helm_test_pod(pod: dict, base_url: str, api_key: str) -> subprocess.CompletedProcess[str]:
    """Run a rendered ``helm test`` Pod's command with its env, only the predictor URL swapped for loopback and the
    API key Secret reference resolved to ``api_key``."""
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert {e["name"] for e in container["env"] if "valueFrom" in e} <= {"KCP_API_KEY"}
    assert env["KCP_TEST_URL"] == f"http://{env['KCP_TEST_MODEL']}-predictor.classifiers.svc.cluster.local"
    env["KCP_TEST_URL"] = base_url
    if any(e["name"] == "KCP_API_KEY" for e in container["env"]):
        env["KCP_API_KEY"] = api_key
    assert container["command"] == ["python", "-c"]
    return subprocess.run([sys.executable, "-c", *container["args"]], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=120)


def test_helm_test_pods_infer_and_read_feedback_of_every_model(tmp_path):
    """The rendered ``helm test`` Pods, run against a real keyed server holding the trained packages: each sends one
    V2 inference (zeros from the metadata, or the model's testRequest) and reads the model's feedback report; a
    wrong key, an unknown model and a request the model refuses all fail the test."""
    model_dir = _trained_models()
    values = tmp_path / "values.yaml"
    katonic = {"inputs": [{"name": "data", "shape": [1], "datatype": "BYTES", "data": [
        '{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}']}]}
    values.write_text(yaml.safe_dump({"models": [
        {"name": "iris", "format": "sklearn", "storageUri": "pvc://m/iris"},
        {"name": "mnist", "format": "keras", "storageUri": "pvc://m/mnist"},
        {"name": "iris-katonic", "format": "katonic", "storageUri": "pvc://m/iris-katonic", "testRequest": katonic},
        {"name": "absent", "format": "sklearn", "storageUri": "pvc://m/absent"}]}))
    pods = {p["metadata"]["labels"]["kserve-classifiers/model"]: p for p in by_kind(helm_template([values]), "Pod")}
    assert set(pods) == {"iris", "mnist", "iris-katonic", "absent"}
    for pod in pods.values():
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    with start_model_server(model_dir, tmp_path, api_key="helm-test-key") as server:
        for model in ("iris", "mnist", "iris-katonic"):
            proc = run_helm_test_pod(pods[model], server.http_url, "helm-test-key")
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert proc.stdout.startswith(f"{model}: inference helm-test-") and "feedback report" in proc.stdout
            assert "the feedback store accepts writes" in proc.stdout
        wrong_key = run_helm_test_pod(pods["iris"], server.http_url, "not-the-key")
        assert wrong_key.returncode != 0 and "answered 401" in wrong_key.stderr
        absent = run_helm_test_pod(pods["absent"], server.http_url, "helm-test-key")
        assert absent.returncode != 0 and "/v2/models/absent answered 404" in absent.stderr
        mnist_pod = copy.deepcopy(pods["mnist"])
        mnist_pod["spec"]["containers"][0]["env"].append({"name": "KCP_TEST_REQUEST", "value": json.dumps(
            {"inputs": [{"name": "input-0", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}]})})
        refused = run_helm_test_pod(mnist_pod, server.http_url, "helm-test-key")
        assert refused.returncode != 0 and "/v2/models/mnist/infer answered 400" in refused.stderr
        bytes_pod = copy.deepcopy(pods["iris-katonic"])
        container = bytes_pod["spec"]["containers"][0]
        container["env"] = [e for e in container["env"] if e["name"] != "KCP_TEST_REQUEST"]
        no_request = run_helm_test_pod(bytes_pod, server.http_url, "helm-test-key")
        assert no_request.returncode != 0 and "give this model a testRequest" in no_request.stderr
        posting = {p["metadata"]["labels"]["kserve-classifiers/model"]: p
                   for p in by_kind(helm_template([values], {"helmTest.postFeedback": "true"}), "Pod")}
        before = httpx.get(f"{server.http_url}/v2/models/iris/feedback", headers={"X-API-Key": "helm-test-key"}).json()
        posted = run_helm_test_pod(posting["iris"], server.http_url, "helm-test-key")
        assert posted.returncode == 0, posted.stdout + posted.stderr
        assert "iris: feedback accepted" not in posted.stdout and "feedback accepted" in posted.stdout
        after = httpx.get(f"{server.http_url}/v2/models/iris/feedback", headers={"X-API-Key": "helm-test-key"}).json()
        assert after["cumulative"]["count"] == before["cumulative"]["count"] + 1, "one feedback item was stored"


def test_grace_period_covers_the_servers_shutdown():
    """terminationGracePeriodSeconds (the rendered one and the schema's minimum) covers what the server may spend
    stopping: KServe's gRPC drain, then its REST drain (each the server's grace_period), then the prediction log's
    last flush; and the worker supervisor's wait when there are several workers."""
    import inspect

    from kserve.model_server import ModelServer

    from predictors.runtime.server import SHUTDOWN_FLUSH_TIMEOUT_S
    from predictors.runtime.workers import STOP_TIMEOUT_S

    grace = inspect.signature(ModelServer.__init__).parameters["grace_period"].default
    budget = max(2 * grace + SHUTDOWN_FLUSH_TIMEOUT_S, STOP_TIMEOUT_S)
    schema = json.loads((REPO / "helm" / "kserve-classifiers" / "values.schema.json").read_text())
    assert schema["properties"]["predictor"]["properties"]["terminationGracePeriodSeconds"]["minimum"] >= budget
    for values_file in VALUE_SETS:
        for isvc in by_kind(render(values_file), "InferenceService"):
            assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] >= budget, isvc["metadata"]["name"]
