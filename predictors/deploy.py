"""Deploy a model package to a Kubernetes cluster running KServe: ``python -m predictors deploy|undeploy``.

``deploy`` reads the package's name from its ``config.json``, server-side-applies an ``InferenceService``
of that name whose custom predictor container (``kserve-container``) runs this project's server on the
package fetched from ``--storage-uri`` by KServe's storage initializer (``/mnt/models``), waits for the
``Ready`` condition and prints the service URL. ``undeploy`` deletes it.

The InferenceService is the one the Helm chart (``helm/kserve-classifiers``) renders for a model with its
default values: same command, arguments, ports, probes and environment (a test compares the two).

    python -m predictors deploy models/iris --storage-uri pvc://models/iris -n classifiers \\
        --api-key-secret kcp-kserve-classifiers-api-key
    python -m predictors undeploy iris -n classifiers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PLURAL = "inferenceservices"
KIND = "InferenceService"
FIELD_MANAGER = "kserve-classifiers-deploy"
CONTAINER_NAME = "kserve-container"  # KServe's name for the predictor container of a custom predictor
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts what STORAGE_URI names
DEFAULT_REGISTRY = "ghcr.io/example"
DEFAULT_IMAGE_REPOSITORY = "kserve-classifiers-predictor"
DEPLOYMENT_MODES = ("Standard", "Knative")
# KServe validates InferenceService names as DNS-1035 labels; 45 leaves room for the names KServe derives.
ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,43}[a-z0-9])?$")
STORAGE_URI = re.compile(r"^(pvc|s3|gs|hf|oci)://[^/\s]+(/\S*)?$|^https?://\S+$")


class DeployError(RuntimeError):
    """Anything that stops a deploy or undeploy: bad input, API errors, not Ready in time."""


def project_version() -> str:
    try:
        from importlib.metadata import version

        return version("kserve-classifiers")
    except Exception:
        return "0.1.0"


def default_image() -> str:
    """The predictor image ``make images`` builds: $KCP_PREDICTOR_IMAGE or <registry>/<repository>:<version>."""
    return os.environ.get("KCP_PREDICTOR_IMAGE") or f"{DEFAULT_REGISTRY}/{DEFAULT_IMAGE_REPOSITORY}:{project_version()}"


# --- the InferenceService -------------------------------------------------------------------------------


def server_args(*, http_port: int = 8080, grpc_port: int = 8081, enable_grpc: bool = True, workers: int = 1,
                max_threads: int = 4, enable_docs_url: bool = False, model_dir: str = MODEL_DIR) -> list[str]:
    """Arguments of ``python -m predictors serve`` in the container (as the chart renders them)."""
    return ["--model_dir", model_dir, "--host", "0.0.0.0", "--http_port", str(http_port),
            "--grpc_port", str(grpc_port), "--enable_grpc", str(enable_grpc).lower(), "--workers", str(workers),
            "--max_threads", str(max_threads), "--enable_docs_url", str(enable_docs_url).lower()]


@dataclass
class DeploySpec:
    """What to deploy. The container is the chart's (tests/test_deploy.py compares them); one replica by default."""

    name: str
    storage_uri: str
    namespace: str = "default"
    image: str = field(default_factory=default_image)
    deployment_mode: str = "Standard"
    min_replicas: int = 1
    max_replicas: int = 1
    api_key_secret: str | None = None
    api_key_secret_key: str = "api-key"
    feedback_db_secret: str | None = None
    feedback_db_secret_key: str = "url"
    service_account: str | None = None
    url_input: bool = True
    http_port: int = 8080
    grpc_port: int = 8081
    cpu: str = "500m"
    memory: str = "1Gi"
    cpu_limit: str = "2"
    memory_limit: str = "2Gi"

    def validate(self) -> None:
        if not ISVC_NAME.match(self.name):
            raise DeployError(f"model name {self.name!r} cannot be an InferenceService name: KServe needs a DNS-1035 "
                              "label (lower-case letters, digits and '-', starting with a letter, at most 45 chars)")
        if not STORAGE_URI.match(self.storage_uri):
            raise DeployError(f"storage URI {self.storage_uri!r} is not one KServe's storage initializer fetches: "
                              "use pvc://<claim>/<path>, s3://<bucket>/<path>, gs://<bucket>/<path> or https://...")
        if self.deployment_mode not in DEPLOYMENT_MODES:
            raise DeployError(f"deployment mode {self.deployment_mode!r}: choose one of {', '.join(DEPLOYMENT_MODES)}")
        if self.min_replicas < 0 or self.max_replicas < 1 or self.min_replicas > self.max_replicas:
            raise DeployError(f"replicas: need 0 <= min ({self.min_replicas}) <= max ({self.max_replicas}), max >= 1")
        if self.min_replicas == 0 and self.deployment_mode != "Knative":
            raise DeployError("min replicas 0 (scale to zero) needs deployment mode Knative")


def inference_service(spec: DeploySpec) -> dict[str, Any]:
    """The InferenceService manifest for ``spec`` (validated first)."""
    spec.validate()
    knative = spec.deployment_mode == "Knative"
    env: list[dict[str, Any]] = [{"name": "STORAGE_URI", "value": spec.storage_uri}]
    if spec.api_key_secret:
        env.append({"name": "KCP_API_KEY", "valueFrom": {"secretKeyRef": {"name": spec.api_key_secret,
                                                                          "key": spec.api_key_secret_key}}})
    if spec.feedback_db_secret:
        env.append({"name": "KCP_FEEDBACK_DB_URL", "valueFrom": {"secretKeyRef": {
            "name": spec.feedback_db_secret, "key": spec.feedback_db_secret_key}}})
    else:
        env.append({"name": "KCP_FEEDBACK_DB_URL", "value": "sqlite:////var/lib/kcp/feedback.db"})
    env.append({"name": "KCP_URL_FETCH_ENABLED", "value": str(spec.url_input).lower()})
    ports = [{"name": "http1", "containerPort": spec.http_port, "protocol": "TCP"}]
    if not knative:  # Knative allows one port per container: REST only there
        ports.append({"name": "h2c", "containerPort": spec.grpc_port, "protocol": "TCP"})
    container = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "predictors", "serve"],
        "args": server_args(http_port=spec.http_port, grpc_port=spec.grpc_port, enable_grpc=not knative),
        "env": env,
        "ports": ports,
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": spec.http_port},
                           "initialDelaySeconds": 5, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": spec.http_port},
                          "initialDelaySeconds": 30, "periodSeconds": 15, "timeoutSeconds": 3, "failureThreshold": 5},
        "resources": {"requests": {"cpu": spec.cpu, "memory": spec.memory},
                      "limits": {"cpu": spec.cpu_limit, "memory": spec.memory_limit}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "data", "mountPath": "/var/lib/kcp"}],
    }
    predictor: dict[str, Any] = {
        "minReplicas": spec.min_replicas,
        "maxReplicas": spec.max_replicas,
        "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(spec.http_port),
                        "prometheus.io/path": "/metrics"},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,  # the server never calls the Kubernetes API
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "data", "emptyDir": {}}],
    }
    if spec.service_account:
        predictor["serviceAccountName"] = spec.service_account
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/name": "kserve-classifiers", "app.kubernetes.io/component": "predictor",
                       "app.kubernetes.io/managed-by": FIELD_MANAGER, "app.kubernetes.io/part-of": "kserve-classifiers",
                       "kserve-classifiers/model": spec.name},
            "annotations": {"serving.kserve.io/deploymentMode": spec.deployment_mode,
                            "serving.kserve.io/enable-prometheus-scraping": "true"},
        },
        "spec": {"predictor": predictor},
    }


def package_name(package: str | Path) -> str:
    """The model name in a package's config.json (the package is fully validated)."""
    from predictors.package import PackageError, load_package

    try:
        return load_package(package).name
    except PackageError as exc:
        raise DeployError(str(exc)) from exc


# --- talking to the cluster --------------------------------------------------------------------------------


def api_client(kubeconfig: str | None = None, context: str | None = None):
    """A client from ``kubeconfig``/$KUBECONFIG/~/.kube/config, or the in-cluster service account."""
    from kubernetes import config

    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
    if kubeconfig or os.path.exists(path):
        try:
            return config.new_client_from_config(config_file=path, context=context)
        except config.ConfigException as exc:
            raise DeployError(f"kubeconfig {path}: {exc}") from exc
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        from kubernetes import client

        return client.ApiClient()
    raise DeployError(f"no kubeconfig at {path} and not running in a cluster: pass --kubeconfig or set KUBECONFIG")


def default_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace of the kubeconfig context (or the pod's), else "default"."""
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = next((c for c in contexts if c["name"] == context), None) if context else active
        namespace = (chosen or {}).get("context", {}).get("namespace")
        if namespace:
            return namespace
    except Exception:
        pass
    sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return sa_ns.read_text().strip() if sa_ns.is_file() else "default"


def _api_error(exc: Exception, what: str) -> DeployError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        reason = exc.reason
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            reason = json.loads(exc.body).get("message", reason)
        hint = ""
        if exc.status == 404:
            hint = " (is KServe installed? the InferenceService CRD serving.kserve.io/v1beta1 is missing)"
        elif exc.status == 403:
            hint = " (your account may not create InferenceServices in this namespace)"
        return DeployError(f"{what}: HTTP {exc.status}: {reason}{hint}")
    return DeployError(f"{what}: {exc}")


def apply(manifest: dict[str, Any], client: Any, *, dry_run: bool = False) -> dict[str, Any]:
    """Server-side apply (field manager ``kserve-classifiers-deploy``, taking over conflicting fields)."""
    from kubernetes.client import CustomObjectsApi

    meta = manifest["metadata"]
    try:
        # Raw response: the generated client maps only 200 to a body, and an apply that creates answers 201.
        response = CustomObjectsApi(client).patch_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], manifest, field_manager=FIELD_MANAGER,
            force=True, dry_run="All" if dry_run else None, _content_type="application/apply-patch+yaml",
            _preload_content=False)
        return json.loads(response.data)
    except Exception as exc:
        raise _api_error(exc, f"applying InferenceService {meta['namespace']}/{meta['name']}") from exc


def ready_condition(isvc: dict[str, Any]) -> dict[str, Any] | None:
    for condition in (isvc.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition
    return None


def wait_ready(name: str, namespace: str, client: Any, *, timeout: float = 600.0, interval: float = 2.0,
               on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Poll until the InferenceService's Ready condition is True; return it. DeployError on timeout."""
    from kubernetes.client import CustomObjectsApi

    api = CustomObjectsApi(client)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            isvc = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as exc:
            raise _api_error(exc, f"reading InferenceService {namespace}/{name}") from exc
        ready = ready_condition(isvc)
        if ready and ready.get("status") == "True":
            return isvc
        waiting = [f"{c.get('type')}={c.get('status')}" + (f" ({c.get('reason')}: {c.get('message')})"
                                                           if c.get("reason") or c.get("message") else "")
                   for c in (isvc.get("status") or {}).get("conditions") or [] if c.get("status") != "True"]
        state = "; ".join(waiting) or "no status yet (is the KServe controller running?)"
        if on_progress and state != last:
            on_progress(state)
        last = state
        if time.monotonic() >= deadline:
            raise DeployError(f"InferenceService {namespace}/{name} not Ready after {timeout:.0f}s: {state}")
        time.sleep(interval)


def deploy(package: str | Path | None, storage_uri: str, *, name: str | None = None, namespace: str | None = None,
           client: Any = None, kubeconfig: str | None = None, context: str | None = None, wait: bool = True,
           timeout: float = 600.0, interval: float = 2.0, out: TextIO | None = None, err: TextIO | None = None,
           **options: Any) -> str:
    """Apply the InferenceService for ``package`` and (unless ``wait`` is false) wait until Ready.

    Returns its URL (``status.url``; empty when not waiting and none is known yet) and prints it to ``out``.
    ``options`` are :class:`DeploySpec` fields (image, deployment_mode, min_replicas, api_key_secret, ...).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if name is None:
        if package is None:
            raise DeployError("give a package directory or a name")
        name = package_name(package)
    if namespace is None:
        namespace = default_namespace(kubeconfig, context)
    manifest = inference_service(DeploySpec(name=name, storage_uri=storage_uri, namespace=namespace, **options))
    client = client or api_client(kubeconfig, context)
    applied = apply(manifest, client)
    print(f"inferenceservice {namespace}/{name} applied (generation {applied['metadata'].get('generation')})",
          file=err, flush=True)
    if not wait:
        url = (applied.get("status") or {}).get("url") or ""
    else:
        isvc = wait_ready(name, namespace, client, timeout=timeout, interval=interval,
                          on_progress=lambda state: print(f"waiting for {name}: {state}", file=err, flush=True))
        url = (isvc.get("status") or {}).get("url") or ""
        print(f"inferenceservice {namespace}/{name} is Ready", file=err, flush=True)
    if url:
        print(url, file=out, flush=True)
    return url


def undeploy(name_or_package: str | Path, *, namespace: str | None = None, client: Any = None,
             kubeconfig: str | None = None, context: str | None = None, wait: bool = True, timeout: float = 120.0,
             interval: float = 1.0, err: TextIO | None = None) -> bool:
    """Delete the InferenceService (named directly or by a package directory). False if it did not exist."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    err = err or sys.stderr
    name = package_name(name_or_package) if Path(name_or_package).is_dir() else str(name_or_package)
    if namespace is None:
        namespace = default_namespace(kubeconfig, context)
    api = CustomObjectsApi(client or api_client(kubeconfig, context))
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            print(f"inferenceservice {namespace}/{name} not found: nothing to delete", file=err, flush=True)
            return False
        raise _api_error(exc, f"deleting InferenceService {namespace}/{name}") from exc
    except Exception as exc:
        raise _api_error(exc, f"deleting InferenceService {namespace}/{name}") from exc
    deadline = time.monotonic() + timeout
    while wait:
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                break
            raise _api_error(exc, f"reading InferenceService {namespace}/{name}") from exc
        if time.monotonic() >= deadline:
            raise DeployError(f"InferenceService {namespace}/{name} still exists {timeout:.0f}s after deletion "
                              "(finalizers?)")
        time.sleep(interval)
    print(f"inferenceservice {namespace}/{name} deleted", file=err, flush=True)
    return True


# --- command line -------------------------------------------------------------------------------------------


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else 'default')")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="return after applying / deleting")


def add_deploy_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Add ``deploy`` and ``undeploy`` to ``python -m predictors``'s subcommands."""
    d = subparsers.add_parser("deploy", help="apply an InferenceService for a package, wait until Ready, print its URL",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("package", help="model package directory (its config.json names the InferenceService)")
    d.add_argument("--storage-uri", required=True,
                   help="where KServe's storage initializer fetches the package: pvc://claim/path, s3://, gs://")
    d.add_argument("--name", help="InferenceService name (default: the package's name)")
    d.add_argument("--image", default=None,
                   help=f"predictor image (default: $KCP_PREDICTOR_IMAGE or {default_image()})")
    d.add_argument("--deployment-mode", choices=DEPLOYMENT_MODES, default="Standard",
                   help="KServe deployment mode: Standard (REST + gRPC) or Knative (REST only, scale to zero)")
    d.add_argument("--min-replicas", type=int, default=1)
    d.add_argument("--max-replicas", type=int, default=1)
    d.add_argument("--api-key-secret", help="Secret holding the API key (key: --api-key-secret-key); none: no key")
    d.add_argument("--api-key-secret-key", default="api-key")
    d.add_argument("--feedback-db-secret", help="Secret holding the feedback database URL (default: SQLite in the pod)")
    d.add_argument("--feedback-db-secret-key", default="url")
    d.add_argument("--service-account", help="service account with the storage credentials (s3://, gs://)")
    d.add_argument("--no-url-input", dest="url_input", action="store_false",
                   help="refuse BYTES inputs holding http(s) URLs (the server then fetches nothing)")
    d.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for Ready")
    d.add_argument("--dry-run", action="store_true", help="print the manifest as JSON and apply nothing")
    _cluster_flags(d)
    d.set_defaults(func=_deploy_command)

    u = subparsers.add_parser("undeploy", help="delete a package's InferenceService")
    u.add_argument("target", help="InferenceService name, or a package directory")
    u.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the deletion")
    _cluster_flags(u)
    u.set_defaults(func=_undeploy_command)


def _spec_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"deployment_mode": args.deployment_mode, "min_replicas": args.min_replicas,
               "max_replicas": args.max_replicas, "api_key_secret": args.api_key_secret,
               "api_key_secret_key": args.api_key_secret_key, "feedback_db_secret": args.feedback_db_secret,
               "feedback_db_secret_key": args.feedback_db_secret_key, "service_account": args.service_account,
               "url_input": args.url_input}
    if args.image:
        options["image"] = args.image
    return options


def _deploy_command(args: argparse.Namespace) -> None:
    try:
        if args.dry_run:
            name = args.name or package_name(args.package)
            namespace = args.namespace or default_namespace(args.kubeconfig, args.context)
            manifest = inference_service(DeploySpec(name=name, storage_uri=args.storage_uri, namespace=namespace,
                                                    **_spec_options(args)))
            print(json.dumps(manifest, indent=2))
            return
        deploy(args.package, args.storage_uri, name=args.name, namespace=args.namespace, kubeconfig=args.kubeconfig,
               context=args.context, wait=args.wait, timeout=args.timeout, **_spec_options(args))
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def _undeploy_command(args: argparse.Namespace) -> None:
    try:
        undeploy(args.target, namespace=args.namespace, kubeconfig=args.kubeconfig, context=args.context,
                 wait=args.wait, timeout=args.timeout)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
