"""``python -m predictors deploy|undeploy``: the chart's objects for a package, rendered by real helm and applied to a
real (CRD-only) Kubernetes API server.

Nothing reconciles InferenceServices there, so the tests play the KServe controller: they patch the status
subresource (Ready, URL) the way KServe does, and the deploy tooling must notice.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

import pytest
import yaml

from predictors import deploy as d
from predictors.package import LabelsFile, PackageConfig, save_package
from tests.fixtures.k8s import REPO, VALUES_DIR, by_kind, crd_dir, helm_template, load_yaml_documents
from tests.fixtures.ports import wait_for
from tests.test_k8s_validate import cluster_serving_runtime_crd


@pytest.fixture
def package(tmp_path):
    """A small valid package named 'iris' (the artifact's content does not matter to deploy)."""
    path = tmp_path / "iris"
    path.mkdir()
    (path / "model.joblib").write_bytes(b"not read by deploy")
    config = PackageConfig(format_version=1, name="iris", version="3", framework="sklearn",
                           task="tabular_classification", artifact="model.joblib",
                           inputs=[{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}])
    save_package(path, config, LabelsFile(labels=[0, 1, 2], names=["setosa", "versicolor", "virginica"]))
    return path


def custom_objects(server):
    from kubernetes.client import CustomObjectsApi

    return CustomObjectsApi(server.api_client())


def set_status(server, namespace: str, name: str, status: dict, *, wait_exists: float = 30.0) -> None:
    """Do what the KServe controller does: write the status subresource (once the object exists)."""
    api = custom_objects(server)
    deadline = time.monotonic() + wait_exists
    while True:
        try:
            api.get_namespaced_custom_object(d.GROUP, d.VERSION, namespace, d.PLURAL, name)
            break
        except Exception:  # not created yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    api.patch_namespaced_custom_object_status(d.GROUP, d.VERSION, namespace, d.PLURAL, name, {"status": status},
                                              _content_type="application/merge-patch+json")


def ready_later(server, namespace: str, name: str, url: str, delay: float = 0.5) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        set_status(server, namespace, name, {"url": url, "conditions": [
            {"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}]})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def cluster(crd_apiserver):
    """The session's CRD API server with KServe's serving runtime CRDs too (what deploy applies besides the
    InferenceService): ServingRuntime from ../shared/crds and ClusterServingRuntime derived from it."""
    docs = [doc for doc in load_yaml_documents(crd_dir() / "serving.kserve.io_servingruntimes.yaml")
            if doc.get("kind") == "CustomResourceDefinition"]
    docs.append(cluster_serving_runtime_crd())
    crd_apiserver.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs), timeout=120)
    wanted = {"servingruntimes.serving.kserve.io", "clusterservingruntimes.serving.kserve.io"}
    wait_for(lambda: wanted <= set(crd_apiserver.kubectl("api-resources", "-o", "name", check=False).stdout.split()),
             timeout=60, what="the serving runtime CRDs in discovery")
    return crd_apiserver


def chart_objects(set_values: dict[str, str], strings: dict[str, str]) -> list[dict]:
    """helm template of the chart itself, as a user would run it, for comparison with what deploy applies."""
    return helm_template((), set_values, release=d.DEFAULT_RELEASE, namespace="classifiers",
                         extra=("--skip-tests", *(a for k, v in strings.items() for a in ("--set-string", f"{k}={v}"))))


def test_deploy_applies_the_charts_runtime_and_inference_service(package):
    """No copy of the chart: deploy's objects are the chart's own for the same values."""
    ours = d.render(package, "pvc://m/iris", namespace="classifiers", api_key_secret="iris-key",
                    feedback_db_secret="feedback-db", max_replicas=3, image="registry.example.com/ml/sk:2")
    chart = chart_objects({
        "models[0].name": "iris", "models[0].format": "sklearn", "models[0].storageUri": "pvc://m/iris",
        "models[0].minReplicas": "1", "models[0].maxReplicas": "3", "apiKey.existingSecret": "iris-key",
        "feedback.database.existingSecret": "feedback-db", "bridge.enabled": "false",
        "image.registry": "registry.example.com/ml", "runtimes.sklearn.image.repository": "sk"},
        {"models[0].version": "3", "image.tag": "2"})
    (isvc,) = by_kind(chart, "InferenceService")
    (runtime,) = [o for o in by_kind(chart, "ServingRuntime") if o["metadata"]["name"] == "kserve-classifiers-sklearn"]
    assert ours == [runtime, isvc]
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    assert runtime["spec"]["containers"][0]["image"] == "registry.example.com/ml/sk:2"
    env = {e["name"]: e for e in isvc["spec"]["predictor"]["model"]["env"]}
    assert env["KCP_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "iris-key"
    assert env["KCP_FEEDBACK_DB_URL"]["valueFrom"]["secretKeyRef"]["name"] == "feedback-db"


def test_values_files_and_set_values_reach_the_chart(package):
    """The user's values file sets the release-wide settings and the model's own (its entry of the package's name);
    the package and the flags fill in the rest; --set goes last, as with helm."""
    runtime, isvc = d.render(package, "s3://other/iris", namespace="team",
                             values_files=[VALUES_DIR / "multi-model.yaml"], set_values=["models[0].timeout=45"])
    assert runtime["kind"] == "ClusterServingRuntime" and "namespace" not in runtime["metadata"]
    assert runtime["spec"]["containers"][0]["image"] == "registry.example.com/ml/kserve-classifiers-sklearn:0.1.0"
    pred = isvc["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"], pred["timeout"]) == (1, 4, 45)
    assert pred["model"]["storageUri"] == "s3://other/iris"
    assert pred["model"]["args"] == ["--max_batch_size", "32", "--max_latency_ms", "5"]
    assert pred["serviceAccountName"] == "models-reader"
    env = {e["name"]: e for e in pred["model"]["env"]}
    assert "KCP_API_KEY" not in env, "the values file says nothing of apiKey: deploy's default, no key"
    assert env["KCP_FEEDBACK_DB_URL"]["valueFrom"]["secretKeyRef"]["name"] == "kserve-classifiers-feedback-db"


def test_objects_pass_the_schema(package, schema_validator):
    objects = d.render(package, "s3://bucket/iris", namespace="x", api_key_secret="k", feedback_db_secret="db",
                       deployment_mode="Knative", min_replicas=0, max_replicas=4, service_account="s3-reader")
    assert [o["kind"] for o in objects] == ["ServingRuntime", "InferenceService"]
    for obj in objects:
        assert not schema_validator.errors(obj)
    (container,) = objects[0]["spec"]["containers"]
    assert [p["name"] for p in container["ports"]] == ["http1"], "Knative: a single port"
    assert container["args"][container["args"].index("--enable_grpc") + 1] == "false"
    from predictors.__main__ import build_parser

    assert build_parser().parse_args([*container["command"][3:], *container["args"]]).model_dir == "/mnt/models"


@pytest.mark.parametrize(("change", "message"), [
    ({"name": "3d-digits"}, "'/models/0/name': '3d-digits' does not match pattern"),
    ({"name": "x" * 46}, "'/models/0/name': maxLength: got 46, want 45"),
    ({"storage_uri": "/data/models/iris"}, "'/models/0/storageUri': '/data/models/iris' does not match pattern"),
    ({"storage_uri": "ftp://host/iris"}, "'/models/0/storageUri': 'ftp://host/iris' does not match pattern"),
    ({"deployment_mode": "RawDeployment"}, "'/kserve/deploymentMode': value must be one of"),
    ({"min_replicas": 3, "max_replicas": 2}, "minReplicas (3) is greater than maxReplicas (2)"),
    ({"min_replicas": 0}, "minReplicas 0 (scale to zero) needs kserve.deploymentMode=Knative"),
    ({"max_replicas": 2}, "the feedback store is SQLite inside each pod"),
    ({"image": "registry.example.com/"}, "image 'registry.example.com/': expected"),
])
def test_bad_input_is_refused_by_the_chart_before_the_cluster(package, change, message):
    options = {"storage_uri": "pvc://models/iris", **change}
    with pytest.raises(d.DeployError) as refused:
        d.render(package, options.pop("storage_uri"), namespace="x", **options)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_deploy_applies_waits_for_ready_and_prints_the_url(cluster, package):
    client = cluster.api_client()
    ready_later(cluster, "team-a", "iris", "http://iris.team-a.example.com")
    out, err = io.StringIO(), io.StringIO()
    url = d.deploy(package, "pvc://models/iris", namespace="team-a", client=client, timeout=60, interval=0.1,
                   out=out, err=err, api_key_secret="iris-key")
    assert url == "http://iris.team-a.example.com"
    assert out.getvalue() == "http://iris.team-a.example.com\n"
    log = err.getvalue()
    assert "servingruntime team-a/kserve-classifiers-sklearn applied" in log
    assert "waiting for iris" in log and "is Ready" in log and "takes no API key" not in log

    api = custom_objects(cluster)
    isvc = api.get_namespaced_custom_object(d.GROUP, d.VERSION, "team-a", d.PLURAL, "iris")
    runtime = api.get_namespaced_custom_object(d.GROUP, "v1alpha1", "team-a", "servingruntimes",
                                               "kserve-classifiers-sklearn")
    for obj in (isvc, runtime):
        managers = {(m["manager"], m["operation"]) for m in obj["metadata"]["managedFields"]}
        assert (d.FIELD_MANAGER, "Apply") in managers, "server-side apply with our field manager"
    model = isvc["spec"]["predictor"]["model"]
    assert (model["modelFormat"]["name"], model["runtime"], model["storageUri"]) == (
        "sklearn", "kserve-classifiers-sklearn", "pvc://models/iris")
    assert runtime["spec"]["containers"][0]["command"] == ["python", "-m", "predictors", "serve"]
    generation = isvc["metadata"]["generation"]

    # applying the same package again changes nothing and is Ready at once
    url = d.deploy(package, "pvc://models/iris", namespace="team-a", client=client, timeout=10, interval=0.1,
                   out=io.StringIO(), err=io.StringIO(), api_key_secret="iris-key")
    assert url == "http://iris.team-a.example.com"
    again = api.get_namespaced_custom_object(d.GROUP, d.VERSION, "team-a", d.PLURAL, "iris")
    assert again["metadata"]["generation"] == generation

    assert d.undeploy(package, namespace="team-a", client=client, err=io.StringIO()) is True
    assert d.undeploy("iris", namespace="team-a", client=client, err=io.StringIO()) is False
    # the runtime stays for other models of its format
    api.get_namespaced_custom_object(d.GROUP, "v1alpha1", "team-a", "servingruntimes", "kserve-classifiers-sklearn")


def test_cluster_scoped_runtime_from_a_values_file(cluster, package):
    client = cluster.api_client()
    err = io.StringIO()
    d.deploy(package, "s3://bucket/iris", namespace="team-f", client=client, wait=False, out=io.StringIO(), err=err,
             values_files=[VALUES_DIR / "multi-model.yaml"])
    assert "clusterservingruntime kserve-classifiers-sklearn applied" in err.getvalue()
    runtime = custom_objects(cluster).get_cluster_custom_object(d.GROUP, "v1alpha1", "clusterservingruntimes",
                                                                "kserve-classifiers-sklearn")
    assert runtime["spec"]["containers"][0]["image"] == "registry.example.com/ml/kserve-classifiers-sklearn:0.1.0"
    assert runtime["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    d.undeploy("iris", namespace="team-f", client=client, err=io.StringIO())


def test_deploy_takes_over_fields_another_manager_set(cluster, package):
    client = cluster.api_client()
    _, manifest = d.render(package, "pvc://models/iris", namespace="team-b")
    manifest["spec"]["predictor"]["maxReplicas"] = 9
    cluster.kubectl("apply", "--server-side", "--field-manager=someone-else", "-f", "-", input=json.dumps(manifest))
    d.deploy(package, "pvc://models/iris", namespace="team-b", client=client, wait=False, out=io.StringIO(),
             err=io.StringIO(), max_replicas=2, feedback_db_secret="feedback-db")
    isvc = custom_objects(cluster).get_namespaced_custom_object(d.GROUP, d.VERSION, "team-b", d.PLURAL, "iris")
    assert isvc["spec"]["predictor"]["maxReplicas"] == 2
    d.undeploy("iris", namespace="team-b", client=client, err=io.StringIO())


def test_deploy_that_never_gets_ready_fails_with_the_reason(cluster, package):
    client = cluster.api_client()

    def not_ready() -> None:
        set_status(cluster, "team-c", "iris", {"conditions": [
            {"type": "Ready", "status": "False", "reason": "RevisionMissing",
             "message": "storage initializer: pvc models not found"}]})

    threading.Thread(target=not_ready, daemon=True).start()
    with pytest.raises(d.DeployError, match="not Ready after 2s: Ready=False \\(RevisionMissing: storage initializer"):
        d.deploy(package, "pvc://models/iris", namespace="team-c", client=client, timeout=2, interval=0.1,
                 out=io.StringIO(), err=io.StringIO())
    d.undeploy("iris", namespace="team-c", client=client, err=io.StringIO())


def test_api_errors_are_one_clear_line(cluster, package):
    runtime, isvc = d.render(package, "pvc://models/iris", namespace="team-d")
    isvc["spec"]["predictor"]["scaleMetric"] = "gpu"
    with pytest.raises(d.DeployError, match=r"applying InferenceService team-d/iris: HTTP 422: .*scaleMetric"):
        d.apply(isvc, cluster.api_client())
    runtime["spec"]["multiModel"] = "sometimes"
    with pytest.raises(d.DeployError, match=r"applying ServingRuntime team-d/kserve-classifiers-sklearn: HTTP \d+: "
                                            r".*multiModel"):
        d.apply(runtime, cluster.api_client())


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m predictors ARGS`` in this process (its parser and handlers; no 5 s interpreter start-up)."""
    from predictors.__main__ import main

    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_deploy_and_undeploy(cluster, package, capsys):
    """The command line: deploy (no wait), Ready from 'the controller', deploy again waiting, undeploy."""
    kube = ["--kubeconfig", str(cluster.kubeconfig)]
    code, out, err = run_cli(capsys, "deploy", str(package), "--storage-uri", "gs://bucket/models/iris", "-n", "team-e",
                             "--no-wait", "--image", "registry.example.com/predictor:1", *kube)
    assert code == 0, err
    assert "inferenceservice team-e/iris applied" in err and "takes no API key" in err
    runtime = custom_objects(cluster).get_namespaced_custom_object(d.GROUP, "v1alpha1", "team-e", "servingruntimes",
                                                                   "kserve-classifiers-sklearn")
    assert runtime["spec"]["containers"][0]["image"] == "registry.example.com/predictor:1"
    set_status(cluster, "team-e", "iris", {"url": "http://iris.team-e.svc.cluster.local",
                                           "conditions": [{"type": "Ready", "status": "True"}]})
    code, out, err = run_cli(capsys, "deploy", str(package), "--storage-uri", "gs://bucket/models/iris", "-n", "team-e",
                             "--image", "registry.example.com/predictor:1", "--timeout", "30", *kube)
    assert code == 0, err
    assert out.strip() == "http://iris.team-e.svc.cluster.local"
    code, out, err = run_cli(capsys, "undeploy", str(package), "-n", "team-e", *kube)
    assert code == 0, err
    assert "inferenceservice team-e/iris deleted" in err


def test_cli_errors_are_one_line_and_exit_1(package, tmp_path, capsys):
    code, _, err = run_cli(capsys, "deploy", str(package), "--storage-uri", "/local/path", "--dry-run", "-n", "x")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: the chart refused the values: ") and "'/local/path' does not match pattern" in err
    code, _, err = run_cli(capsys, "deploy", str(tmp_path / "missing"), "--storage-uri", "s3://b/p", "--dry-run")
    assert code == 1 and "package directory does not exist" in err
    code, _, err = run_cli(capsys, "deploy", str(package), "--dry-run", "-n", "x")
    assert (code, err.strip()) == (1, "error: no storage URI for iris: pass --storage-uri (pvc://, s3://, gs://, "
                                      "https://)")
    code, _, err = run_cli(capsys, "deploy", str(package), "--storage-uri", "s3://b/p", "-n", "x",
                           "--kubeconfig", str(tmp_path / "no-such-kubeconfig"))
    assert code == 1 and err.splitlines()[-1].startswith("error: kubeconfig")


def test_module_entry_point_has_deploy(package, tmp_path):
    """The real ``python -m predictors deploy --dry-run`` prints what it would apply (no cluster needed)."""
    proc = subprocess.run([sys.executable, "-m", "predictors", "deploy", str(package), "--storage-uri",
                           "s3://bucket/iris", "--dry-run", "-n", "x", "--kubeconfig", str(tmp_path / "none"),
                           "--set", "models[0].timeout=30"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert [o["kind"] for o in listing["items"]] == ["ServingRuntime", "InferenceService"]
    isvc = listing["items"][1]
    assert (isvc["metadata"]["name"], isvc["metadata"]["namespace"]) == ("iris", "x")
    assert isvc["spec"]["predictor"]["timeout"] == 30
