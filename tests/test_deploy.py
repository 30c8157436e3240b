"""``python -m predictors deploy|undeploy`` against a real (CRD-only) Kubernetes API server.

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

from predictors import deploy as d
from predictors.package import LabelsFile, PackageConfig, save_package
from tests.fixtures.k8s import REPO, by_kind, helm_template


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


def test_manifest_is_the_charts_inference_service():
    """deploy and the chart must run the same container: same command, args, ports, probes, env, mounts."""
    (chart_isvc,) = by_kind(helm_template(set_values={"models[0].name": "iris", "models[0].storageUri": "pvc://m/iris",
                                                      "models[0].minReplicas": "1", "models[0].maxReplicas": "3"}),
                            "InferenceService")
    api_secret = chart_isvc["spec"]["predictor"]["containers"][0]["env"][1]["valueFrom"]["secretKeyRef"]["name"]
    ours = d.inference_service(d.DeploySpec(name="iris", storage_uri="pvc://m/iris", namespace="classifiers",
                                            image=chart_isvc["spec"]["predictor"]["containers"][0]["image"],
                                            max_replicas=3, api_key_secret=api_secret))
    chart_pred, our_pred = chart_isvc["spec"]["predictor"], ours["spec"]["predictor"]
    assert our_pred["containers"] == chart_pred["containers"]
    for key in ("minReplicas", "maxReplicas", "annotations", "securityContext", "volumes",
                "automountServiceAccountToken"):
        assert our_pred[key] == chart_pred[key], key
    assert ours["metadata"]["annotations"] == chart_isvc["metadata"]["annotations"]
    assert ours["metadata"]["name"] == "iris" and ours["metadata"]["namespace"] == "classifiers"


def test_manifest_passes_the_schema(schema_validator):
    spec = d.DeploySpec(name="iris", storage_uri="s3://bucket/iris", api_key_secret="k", feedback_db_secret="db",
                        deployment_mode="Knative", min_replicas=0, max_replicas=4, service_account="s3-reader")
    manifest = d.inference_service(spec)
    assert not schema_validator.errors(manifest)
    (container,) = manifest["spec"]["predictor"]["containers"]
    assert [p["name"] for p in container["ports"]] == ["http1"], "Knative: a single port"
    assert container["args"][container["args"].index("--enable_grpc") + 1] == "false"
    from predictors.__main__ import build_parser

    assert build_parser().parse_args([*container["command"][3:], *container["args"]]).model_dir == "/mnt/models"


@pytest.mark.parametrize(("change", "message"), [
    ({"name": "3d-digits"}, "DNS-1035 label"),
    ({"name": "x" * 46}, "at most 45"),
    ({"storage_uri": "/data/models/iris"}, "is not one KServe's storage initializer fetches"),
    ({"storage_uri": "ftp://host/iris"}, "is not one KServe's storage initializer fetches"),
    ({"deployment_mode": "RawDeployment"}, "choose one of Standard, Knative"),
    ({"min_replicas": 3, "max_replicas": 2}, "need 0 <= min (3) <= max (2)"),
    ({"min_replicas": 0}, "needs deployment mode Knative"),
])
def test_bad_input_is_refused_before_the_cluster(change, message):
    spec = d.DeploySpec(**{"name": "iris", "storage_uri": "pvc://models/iris", **change})
    with pytest.raises(d.DeployError, match=message.replace("(", r"\(").replace(")", r"\)")):
        d.inference_service(spec)


def test_deploy_applies_waits_for_ready_and_prints_the_url(crd_apiserver, package):
    client = crd_apiserver.api_client()
    ready_later(crd_apiserver, "team-a", "iris", "http://iris.team-a.example.com")
    out, err = io.StringIO(), io.StringIO()
    url = d.deploy(package, "pvc://models/iris", namespace="team-a", client=client, timeout=60, interval=0.1,
                   out=out, err=err, api_key_secret="iris-key")
    assert url == "http://iris.team-a.example.com"
    assert out.getvalue() == "http://iris.team-a.example.com\n"
    assert "waiting for iris" in err.getvalue() and "is Ready" in err.getvalue()

    isvc = custom_objects(crd_apiserver).get_namespaced_custom_object(d.GROUP, d.VERSION, "team-a", d.PLURAL, "iris")
    managers = {(m["manager"], m["operation"]) for m in isvc["metadata"]["managedFields"]}
    assert (d.FIELD_MANAGER, "Apply") in managers, "server-side apply with our field manager"
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert {"name": "STORAGE_URI", "value": "pvc://models/iris"} in container["env"]
    generation = isvc["metadata"]["generation"]

    # applying the same package again changes nothing and is Ready at once
    url = d.deploy(package, "pvc://models/iris", namespace="team-a", client=client, timeout=10, interval=0.1,
                   out=io.StringIO(), err=io.StringIO(), api_key_secret="iris-key")
    assert url == "http://iris.team-a.example.com"
    again = custom_objects(crd_apiserver).get_namespaced_custom_object(d.GROUP, d.VERSION, "team-a", d.PLURAL, "iris")
    assert again["metadata"]["generation"] == generation

    assert d.undeploy(package, namespace="team-a", client=client, err=io.StringIO()) is True
    assert d.undeploy("iris", namespace="team-a", client=client, err=io.StringIO()) is False


def test_deploy_takes_over_fields_another_manager_set(crd_apiserver, package):
    client = crd_apiserver.api_client()
    manifest = d.inference_service(d.DeploySpec(name="iris", storage_uri="pvc://models/iris", namespace="team-b"))
    manifest["spec"]["predictor"]["maxReplicas"] = 9
    crd_apiserver.kubectl("apply", "--server-side", "--field-manager=someone-else", "-f", "-",
                          input=json.dumps(manifest))
    d.deploy(package, "pvc://models/iris", namespace="team-b", client=client, wait=False, out=io.StringIO(),
             err=io.StringIO(), max_replicas=2)
    isvc = custom_objects(crd_apiserver).get_namespaced_custom_object(d.GROUP, d.VERSION, "team-b", d.PLURAL, "iris")
    assert isvc["spec"]["predictor"]["maxReplicas"] == 2
    d.undeploy("iris", namespace="team-b", client=client, err=io.StringIO())


def test_deploy_that_never_gets_ready_fails_with_the_reason(crd_apiserver, package):
    client = crd_apiserver.api_client()

    def not_ready() -> None:
        set_status(crd_apiserver, "team-c", "iris", {"conditions": [
            {"type": "Ready", "status": "False", "reason": "RevisionMissing",
             "message": "storage initializer: pvc models not found"}]})

    threading.Thread(target=not_ready, daemon=True).start()
    with pytest.raises(d.DeployError, match="not Ready after 2s: Ready=False \\(RevisionMissing: storage initializer"):
        d.deploy(package, "pvc://models/iris", namespace="team-c", client=client, timeout=2, interval=0.1,
                 out=io.StringIO(), err=io.StringIO())
    d.undeploy("iris", namespace="team-c", client=client, err=io.StringIO())


def test_api_errors_are_one_clear_line(crd_apiserver, package):
    manifest = d.inference_service(d.DeploySpec(name="iris", storage_uri="pvc://models/iris", namespace="team-d"))
    manifest["spec"]["predictor"]["scaleMetric"] = "gpu"
    with pytest.raises(d.DeployError, match=r"applying InferenceService team-d/iris: HTTP 422: .*scaleMetric"):
        d.apply(manifest, crd_apiserver.api_client())


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


def test_cli_deploy_and_undeploy(crd_apiserver, package, capsys):
    """The command line: deploy (no wait), Ready from 'the controller', deploy again waiting, undeploy."""
    kube = ["--kubeconfig", str(crd_apiserver.kubeconfig)]
    code, out, err = run_cli(capsys, "deploy", str(package), "--storage-uri", "gs://bucket/models/iris", "-n", "team-e",
                             "--no-wait", "--image", "registry.example.com/predictor:1", *kube)
    assert code == 0, err
    assert "inferenceservice team-e/iris applied" in err
    set_status(crd_apiserver, "team-e", "iris", {"url": "http://iris.team-e.svc.cluster.local",
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
    assert (code, err.strip()) == (1, "error: storage URI '/local/path' is not one KServe's storage initializer "
                                      "fetches: use pvc://<claim>/<path>, s3://<bucket>/<path>, gs://<bucket>/<path> "
                                      "or https://...")
    code, _, err = run_cli(capsys, "deploy", str(tmp_path / "missing"), "--storage-uri", "s3://b/p", "--dry-run")
    assert code == 1 and "package directory does not exist" in err
    code, _, err = run_cli(capsys, "deploy", str(package), "--storage-uri", "s3://b/p", "-n", "x",
                           "--kubeconfig", str(tmp_path / "no-such-kubeconfig"))
    assert code == 1 and err.startswith("error: kubeconfig")


def test_module_entry_point_has_deploy(package, tmp_path):
    """The real ``python -m predictors deploy --dry-run`` prints the manifest (no cluster needed)."""
    proc = subprocess.run([sys.executable, "-m", "predictors", "deploy", str(package), "--storage-uri",
                           "s3://bucket/iris", "--dry-run", "-n", "x", "--kubeconfig", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert manifest["kind"] == "InferenceService"
    assert (manifest["metadata"]["name"], manifest["metadata"]["namespace"]) == ("iris", "x")
