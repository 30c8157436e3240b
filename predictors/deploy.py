"""Deploy a model package to a Kubernetes cluster running KServe: ``python -m predictors deploy|undeploy``.

``deploy`` renders the Helm chart (``helm/kserve-classifiers``, by ``helm template``) for one model, the package:
its name, format (``framework``) and version from ``config.json`` and the ``--storage-uri`` KServe's storage
initializer fetches it from, on top of the user's values files (``-f``) and under their ``--set`` values. Of what
the chart renders it server-side-applies the package's InferenceService and the serving runtime that
InferenceService names (field manager ``kserve-classifiers-deploy``), waits for ``Ready`` and prints the service
URL. ``undeploy`` deletes the InferenceService; the runtime stays, as other models of its format may use it.

The chart is the one definition of both objects, and it checks the values (its schema and cross-field rules, e.g.
SQLite feedback with more than one replica) before anything reaches the cluster. The release-wide objects (the API
key and feedback database Secrets, the bridge, the NetworkPolicy, alerts, dashboards) are ``helm install``'s: a
Secret named here must exist. Without ``--api-key-secret`` (or ``apiKey`` in a values file) the model takes no key.

    python -m predictors deploy models/iris --storage-uri pvc://models/iris -n classifiers \\
        --api-key-secret kcp-kserve-classifiers-api-key
    python -m predictors deploy models/iris --storage-uri s3://bucket/iris -f my-values.yaml --set image.tag=0.2.0
    python -m predictors undeploy iris -n classifiers
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PLURAL = "inferenceservices"
KIND = "InferenceService"
FIELD_MANAGER = "kserve-classifiers-deploy"
REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "kserve-classifiers"
# Release name: the chart names the runtimes "<release>-<format>" when the release holds the chart's name.
DEFAULT_RELEASE = "kserve-classifiers"
DEPLOYMENT_MODES = ("Standard", "Knative")
RUNTIME_KINDS = ("ServingRuntime", "ClusterServingRuntime")
# The kinds deploy applies: kind -> plural (the group and version come from each object's apiVersion).
PLURALS = {KIND: PLURAL, "ServingRuntime": "servingruntimes", "ClusterServingRuntime": "clusterservingruntimes"}
# Below the user's values files: the release-wide parts deploy does not apply stay out of the way (the bridge
# would check models deploy leaves out; an API key would name the chart's Secret, which deploy does not create).
DEPLOY_DEFAULTS: dict[str, Any] = {"apiKey": {"enabled": False}, "bridge": {"enabled": False}}


class DeployError(RuntimeError):
    """Anything that stops a deploy or undeploy: bad input, the chart refusing the values, API errors, not Ready."""


# --- rendering the chart --------------------------------------------------------------------------------------


def helm_binary() -> str:
    """$KCP_HELM, the project's pinned helm (.tools/bin, ``make tools``), or helm on PATH."""
    from predictors.settings import ToolSettings

    configured = ToolSettings().helm
    pinned = str(REPO / ".tools" / "bin" / "helm")
    for candidate in (str(configured) if configured else None, pinned, shutil.which("helm")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise DeployError("helm not found: run make tools (installs it into .tools/bin), put helm on PATH or set KCP_HELM")


def chart_dir(chart: str | Path | None = None) -> Path:
    from predictors.settings import ToolSettings

    path = Path(chart or ToolSettings().chart or CHART)
    if not (path / "Chart.yaml").is_file():
        raise DeployError(f"no Helm chart at {path}: pass --chart or set KCP_CHART to helm/kserve-classifiers")
    return path


def split_image(reference: str) -> tuple[str, str, str, str]:
    """``registry/path/repository[:tag][@digest]`` as the chart's (registry, repository, tag, digest)."""
    rest, _, digest = reference.partition("@")
    registry, _, last = rest.rpartition("/")
    repository, _, tag = last.partition(":")
    if not repository:
        raise DeployError(f"image {reference!r}: expected [registry/]repository[:tag][@sha256:digest]")
    return registry, repository, tag, digest


def option_values(fmt: str, *, image: str | None = None, deployment_mode: str | None = None,
                  api_key_secret: str | None = None, api_key_secret_key: str | None = None,
                  feedback_db_secret: str | None = None, feedback_db_secret_key: str | None = None,
                  service_account: str | None = None, url_input: bool | None = None) -> dict[str, Any]:
    """The chart values the command-line options stand for (None: leave the values files' or the chart's)."""
    values: dict[str, Any] = {}
    if image:
        registry, repository, tag, digest = split_image(image)
        values["image"] = {"registry": registry, **({"tag": tag} if tag else {})}
        values["runtimes"] = {fmt: {"image": {"repository": repository, "digest": digest}}}
    if deployment_mode:
        values.setdefault("kserve", {})["deploymentMode"] = deployment_mode
    if service_account:
        values.setdefault("kserve", {})["serviceAccountName"] = service_account
    if api_key_secret:
        values["apiKey"] = {"enabled": True, "existingSecret": api_key_secret,
                            **({"secretKey": api_key_secret_key} if api_key_secret_key else {})}
    if feedback_db_secret:
        values["feedback"] = {"database": {"existingSecret": feedback_db_secret,
                                           **({"secretKey": feedback_db_secret_key} if feedback_db_secret_key else {})}}
    if url_input is not None:
        values["predictor"] = {"urlInput": {"enabled": url_input}}
    return values


def users_model_entry(values_files: Iterable[str | Path], name: str) -> dict[str, Any]:
    """The entry named ``name`` in the ``models`` of the last values file that sets them (helm replaces lists)."""
    import yaml

    models = None
    for path in values_files:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise DeployError(f"values file {path}: {exc}") from exc
        if isinstance(values, dict) and "models" in values:
            models = values["models"]
    return copy.deepcopy(next((m for m in models or [] if isinstance(m, dict) and m.get("name") == name), {}))


def helm_error(stderr: str) -> str:
    """helm's error as one line: its "Error: " prefix, the template position and the --debug hint dropped."""
    lines = [line.strip() for line in stderr.splitlines()
             if line.strip() and not line.startswith("Use --debug") and not line.startswith("WARNING")]
    text = " ".join(lines).removeprefix("Error: ")
    if text.startswith("execution error at ("):
        text = text.split("): ", 1)[-1]
    return text or "helm template failed with no message"


def render(package: str | Path | None, storage_uri: str | None = None, *, name: str | None = None,
           fmt: str | None = None, version: str | None = None, namespace: str = "default",
           release: str = DEFAULT_RELEASE, values_files: Iterable[str | Path] = (), set_values: Iterable[str] = (),
           chart: str | Path | None = None, min_replicas: int | None = None, max_replicas: int | None = None,
           **options: Any) -> list[dict[str, Any]]:
    """What deploy applies for ``package``: the chart's serving runtime and InferenceService for it, in that order.

    Values, later ones winning: :data:`DEPLOY_DEFAULTS`, ``values_files``, the model (the values files' entry of its
    name, if any, with the package's name, format and version, ``storage_uri`` and the replica counts),
    ``options`` (see :func:`option_values`), ``set_values`` (``key=value`` as helm's ``--set``).
    """
    import yaml

    if package is not None:
        loaded = load(package)
        name = name or loaded.name
        fmt = fmt or loaded.config.framework
        version = version or loaded.version
    if not name or not fmt:
        raise DeployError("give a package directory (or a name and a format)")
    values_files = [str(f) for f in values_files]
    model = {"minReplicas": 1, "maxReplicas": 1, **users_model_entry(values_files, name), "name": name,
             "format": fmt}
    if version:
        model["version"] = str(version)
    if storage_uri:
        model["storageUri"] = storage_uri
    if not model.get("storageUri"):
        raise DeployError(f"no storage URI for {name}: pass --storage-uri (pvc://, s3://, gs://, https://)")
    if min_replicas is not None:
        model["minReplicas"] = min_replicas
    if max_replicas is not None:
        model["maxReplicas"] = max_replicas
    overrides = {**option_values(fmt, **options), "models": [model]}
    with tempfile.TemporaryDirectory(prefix="kcp-deploy-") as tmp:
        defaults_file, overrides_file = Path(tmp, "deploy-defaults.yaml"), Path(tmp, "deploy-model.yaml")
        defaults_file.write_text(yaml.safe_dump(DEPLOY_DEFAULTS))
        overrides_file.write_text(yaml.safe_dump(overrides))
        cmd = [helm_binary(), "template", release, str(chart_dir(chart)), "--namespace", namespace, "--skip-tests",
               "-f", str(defaults_file), *(a for f in values_files for a in ("-f", f)), "-f", str(overrides_file),
               *(a for s in set_values for a in ("--set", s))]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DeployError(f"helm template: {exc}") from exc
    if proc.returncode != 0:
        raise DeployError(f"the chart refused the values: {helm_error(proc.stderr)}")
    objects = [o for o in yaml.safe_load_all(proc.stdout) if o]
    isvc = next((o for o in objects if o.get("kind") == KIND and o["metadata"]["name"] == name), None)
    if isvc is None:  # a --set that renamed models[0]
        raise DeployError(f"the chart rendered no InferenceService named {name}")
    runtime_name = isvc["spec"]["predictor"]["model"]["runtime"]
    runtime = next((o for o in objects if o.get("kind") in RUNTIME_KINDS and o["metadata"]["name"] == runtime_name),
                   None)
    if runtime is None:
        raise DeployError(f"the chart rendered no serving runtime {runtime_name} for {name}")
    return [runtime, isvc]


def load(package: str | Path):
    """The package (fully validated; its name, framework and version are what deploy needs)."""
    from predictors.package import PackageError, load_package

    try:
        return load_package(package)
    except PackageError as exc:
        raise DeployError(str(exc)) from exc


def package_name(package: str | Path) -> str:
    """The model name in a package's config.json (the package is fully validated)."""
    return load(package).name


def notes(objects: list[dict[str, Any]]) -> list[str]:
    """What the user should know about the objects before they go out: a model without an API key."""
    isvc = next(o for o in objects if o["kind"] == KIND)
    env = {e["name"] for o in objects for c in (o["spec"].get("containers") or []) for e in c.get("env") or []}
    env |= {e["name"] for e in isvc["spec"]["predictor"]["model"].get("env") or []}
    if "KCP_API_KEY" not in env:
        return [f"note: {isvc['metadata']['name']} takes no API key (no --api-key-secret): every caller that reaches "
                "it is served; helm install adds the chart's NetworkPolicy"]
    return []


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


def _api_error(exc: Exception, what: str, kind: str = KIND) -> DeployError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        reason = exc.reason
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            reason = json.loads(exc.body).get("message", reason)
        hint = ""
        if exc.status == 404:
            hint = f" (is KServe installed? the {kind} CRD of {GROUP} is missing)"
        elif exc.status == 403:
            hint = f" (your account may not create {kind} objects here)"
        return DeployError(f"{what}: HTTP {exc.status}: {reason}{hint}")
    return DeployError(f"{what}: {exc}")


def _where(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


def apply(manifest: dict[str, Any], client: Any, *, dry_run: bool = False) -> dict[str, Any]:
    """Server-side apply one of the kinds in :data:`PLURALS` (field manager ``kserve-classifiers-deploy``, taking
    over conflicting fields); the object as the server stored it."""
    from kubernetes.client import CustomObjectsApi

    kind, meta = manifest["kind"], manifest["metadata"]
    group, _, version = manifest["apiVersion"].partition("/")
    api = CustomObjectsApi(client)
    # Raw response: the generated client maps only 200 to a body, and an apply that creates answers 201.
    common = {"field_manager": FIELD_MANAGER, "force": True, "dry_run": "All" if dry_run else None,
              "_content_type": "application/apply-patch+yaml", "_preload_content": False}
    try:
        if meta.get("namespace"):
            response = api.patch_namespaced_custom_object(group, version, meta["namespace"], PLURALS[kind],
                                                          meta["name"], manifest, **common)
        else:
            response = api.patch_cluster_custom_object(group, version, PLURALS[kind], meta["name"], manifest,
                                                       **common)
        return json.loads(response.data)
    except Exception as exc:
        raise _api_error(exc, f"applying {kind} {_where(manifest)}", kind) from exc


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


def deploy(package: str | Path, storage_uri: str | None = None, *, namespace: str | None = None, client: Any = None,
           kubeconfig: str | None = None, context: str | None = None, wait: bool = True, timeout: float = 600.0,
           interval: float = 2.0, out: TextIO | None = None, err: TextIO | None = None, **options: Any) -> str:
    """Apply the chart's serving runtime and InferenceService for ``package``; unless ``wait`` is false, wait until
    the InferenceService is Ready.

    Returns its URL (``status.url``; empty when not waiting and none is known yet) and prints it to ``out``.
    ``options`` are :func:`render`'s (name, release, values_files, set_values, image, max_replicas, ...).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if namespace is None:
        namespace = default_namespace(kubeconfig, context)
    objects = render(package, storage_uri, namespace=namespace, **options)
    for line in notes(objects):
        print(line, file=err, flush=True)
    client = client or api_client(kubeconfig, context)
    for obj in objects:
        applied = apply(obj, client)
        print(f"{obj['kind'].lower()} {_where(obj)} applied (generation {applied['metadata'].get('generation')})",
              file=err, flush=True)
    name = objects[-1]["metadata"]["name"]
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
    d = subparsers.add_parser("deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="apply the chart's InferenceService for a package, wait until Ready, print its URL")
    d.add_argument("package", help="model package directory (its config.json gives the name, format and version)")
    d.add_argument("--storage-uri", help="where KServe's storage initializer fetches the package: pvc://claim/path, "
                   "s3://, gs://, https:// (default: the values files' entry for the model)")
    d.add_argument("--name", help="InferenceService name (default: the package's name)")
    d.add_argument("-f", "--values", dest="values_files", action="append", default=[], metavar="FILE",
                   help="chart values file, as helm's -f (repeatable; its models entry of this name is the base)")
    d.add_argument("--set", dest="set_values", action="append", default=[], metavar="KEY=VALUE",
                   help="chart value, as helm's --set (repeatable; the model is models[0])")
    d.add_argument("--release", default=DEFAULT_RELEASE, help="release name the chart names objects after "
                   "(the runtime is <release>-<format>; use your helm release's name to share its runtimes)")
    d.add_argument("--chart", help=f"chart directory (default: $KCP_CHART or {CHART})")
    d.add_argument("--image", help="runtime image [registry/]repository[:tag][@digest] (default: the chart's "
                   "runtimes.<format>.image)")
    d.add_argument("--deployment-mode", choices=DEPLOYMENT_MODES,
                   help="KServe deployment mode: Standard (REST + gRPC, the chart's default) or Knative")
    d.add_argument("--min-replicas", type=int, help="default 1")
    d.add_argument("--max-replicas", type=int, help="default 1 (more needs a feedback database)")
    d.add_argument("--api-key-secret", help="existing Secret holding the API key (key: --api-key-secret-key); "
                   "none: no key")
    d.add_argument("--api-key-secret-key", help="key in that Secret (default: the chart's, api-key)")
    d.add_argument("--feedback-db-secret", help="existing Secret holding the feedback database URL "
                   "(default: SQLite in the pod)")
    d.add_argument("--feedback-db-secret-key", help="key in that Secret (default: the chart's, url)")
    d.add_argument("--service-account", help="service account with the storage credentials (s3://, gs://)")
    d.add_argument("--no-url-input", dest="url_input", action="store_false", default=None,
                   help="refuse BYTES inputs holding http(s) URLs (the server then fetches nothing)")
    d.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for Ready")
    d.add_argument("--dry-run", action="store_true", help="print the objects as a JSON List and apply nothing")
    _cluster_flags(d)
    d.set_defaults(func=_deploy_command)

    u = subparsers.add_parser("undeploy", help="delete a package's InferenceService")
    u.add_argument("target", help="InferenceService name, or a package directory")
    u.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the deletion")
    _cluster_flags(u)
    u.set_defaults(func=_undeploy_command)


def _render_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"name": args.name, "release": args.release, "chart": args.chart, "values_files": args.values_files,
            "set_values": args.set_values, "image": args.image, "deployment_mode": args.deployment_mode,
            "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
            "api_key_secret": args.api_key_secret, "api_key_secret_key": args.api_key_secret_key,
            "feedback_db_secret": args.feedback_db_secret, "feedback_db_secret_key": args.feedback_db_secret_key,
            "service_account": args.service_account, "url_input": args.url_input}


def _deploy_command(args: argparse.Namespace) -> None:
    try:
        if args.dry_run:
            namespace = args.namespace or default_namespace(args.kubeconfig, args.context)
            objects = render(args.package, args.storage_uri, namespace=namespace, **_render_options(args))
            for line in notes(objects):
                print(line, file=sys.stderr)
            print(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2))
            return
        deploy(args.package, args.storage_uri, namespace=args.namespace, kubeconfig=args.kubeconfig,
               context=args.context, wait=args.wait, timeout=args.timeout, **_render_options(args))
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
