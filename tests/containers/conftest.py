"""The built images run the way the chart runs them, under podman on the host's loopback.

Each container is started from the rendered chart's own container spec: for a model server, the container of the
serving runtime its InferenceService names with the model's args and env added (as KServe merges them), for the
bridge its Deployment's. Its command and args (ports moved to free ones, the broker and model server pointed at
loopback), its environment (secrets filled in with a test key), its security context (numeric non-root user,
read-only root filesystem, every capability dropped, no privilege escalation) and its emptyDir volumes as tmpfs
mounts. /mnt/models holds packages of the repository's models/, mounted read-only where KServe's storage
initializer would have put them. Run by scripts/container-test.sh (`make container-test`), which builds the images
first; plain `pytest` deselects these (marker ``container``).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.fixtures.k8s import REPO, by_kind, helm_template
from tests.fixtures.ports import free_port, wait_for

ENGINE = "podman"
API_KEY = "container-test-key"
# Kubernetes' default terminationGracePeriodSeconds, for an InferenceService that sets none.
DEFAULT_GRACE_S = 30
RUNTIME_KINDS = ("ServingRuntime", "ClusterServingRuntime")


def engine(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO / "docker/containers.conf"))}
    return subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout, check=check, env=env)


def image(role: str) -> str:
    """The image under test: $KCP_PREDICTOR_IMAGE, $KCP_BRIDGE_IMAGE or $KCP_SKLEARN_IMAGE, as
    scripts/container-test.sh sets them."""
    name = os.environ.get(f"KCP_{role.upper()}_IMAGE")
    if not name:
        pytest.fail(f"KCP_{role.upper()}_IMAGE is not set: run the container tests with make container-test")
    if engine("image", "exists", name, check=False).returncode != 0:
        pytest.fail(f"image {name} is not built: run make images (or make container-test)")
    return name


def replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with the value after ``flag`` replaced; the chart must pass ``flag``."""
    assert flag in args, f"the chart's args have no {flag}: {args}"
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2:]]


def security_flags(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """podman run flags for the chart's pod and container security contexts (those the chart sets)."""
    ctx = {**pod, **container}
    flags = []
    if ctx.get("runAsUser") is not None:
        assert ctx.get("runAsNonRoot") and ctx["runAsUser"] != 0
        flags += ["--user", f"{ctx['runAsUser']}:{ctx.get('runAsGroup', ctx['runAsUser'])}"]
    if ctx.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    if "ALL" in ctx.get("capabilities", {}).get("drop", []):
        flags.append("--cap-drop=ALL")
    if ctx.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    assert {"--read-only", "--cap-drop=ALL", "--user"} <= set(flags), f"the chart no longer hardens: {ctx}"
    return flags


def env_flags(container: dict[str, Any], secrets: dict[str, str]) -> list[str]:
    flags = []
    for var in container.get("env", []):
        value = var.get("value", secrets.get(var["name"]))
        assert value is not None, f"no test value for {var['name']}"
        flags += ["-e", f"{var['name']}={value}"]
    return flags


@dataclass
class Container:
    """A detached container on the host network, always removed."""

    name: str
    grace_s: int
    ports: dict[str, int] = field(default_factory=dict)

    def running(self) -> bool:
        state = json.loads(engine("inspect", "--format", "{{json .State}}", self.name).stdout)
        if not state["Running"]:
            raise RuntimeError(f"{self.name} exited with {state['ExitCode']}:\n{self.logs()[-3000:]}")
        return True

    def logs(self) -> str:
        out = engine("logs", self.name, check=False)
        return out.stdout + out.stderr

    def terminate(self) -> int:
        """SIGTERM, as the kubelet sends it; the exit code, or TimeoutExpired after the grace period."""
        engine("kill", "--signal", "TERM", self.name)
        return int(engine("wait", self.name, timeout=self.grace_s).stdout.strip())

    def remove(self) -> None:
        engine("rm", "--force", "--time", "0", self.name, check=False)


def run_container(role: str, spec: dict[str, Any], pod_security: dict[str, Any], args: list[str],
                  secrets: dict[str, str], volumes: list[str], grace_s: int) -> Container:
    name = f"kcp-ct-{role}-{uuid.uuid4().hex[:8]}"
    tmpfs = [f for m in spec.get("volumeMounts", []) for f in ("--tmpfs", f"{m['mountPath']}:rw,U")]
    engine("run", "--detach", "--name", name, "--network=host", "--no-healthcheck",
           *security_flags(pod_security, spec.get("securityContext", {})), *tmpfs, *volumes,
           *env_flags(spec, secrets), "--entrypoint", json.dumps(spec["command"]), image(role), *args)
    return Container(name, grace_s)


@dataclass
class Predictor:
    container: Container
    http_port: int
    grpc_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": API_KEY}, timeout=30.0)


def model_container(chart: list[dict], model: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """For the chart's InferenceService ``model``: the container KServe runs (its serving runtime's, with the
    model's args and env appended), the InferenceService's predictor (the pod's settings) and the runtime."""
    (isvc,) = [o for o in by_kind(chart, "InferenceService") if o["metadata"]["name"] == model]
    predictor = isvc["spec"]["predictor"]
    (runtime,) = [o for o in chart if o["kind"] in RUNTIME_KINDS
                  and o["metadata"]["name"] == predictor["model"]["runtime"]]
    spec = copy.deepcopy(runtime["spec"]["containers"][0])
    spec["args"] = [*spec.get("args", []), *predictor["model"].get("args", [])]
    spec["env"] = [*spec.get("env", []), *predictor["model"].get("env", [])]
    return spec, predictor, runtime


def start_predictor(role: str, chart: list[dict], model: str, volumes: list[str]) -> Iterator[Predictor]:
    """The ``role`` image serving ``volumes`` (mounted under /mnt/models) as the chart's InferenceService ``model``
    runs it, ready; removed afterwards."""
    spec, predictor_spec, _ = model_container(chart, model)
    http_port, grpc_port = free_port(), free_port()
    args = replace_flag(replace_flag(spec["args"], "--http_port", str(http_port)), "--grpc_port", str(grpc_port))
    container = run_container(role, spec, predictor_spec.get("securityContext", {}), args,
                              {"KCP_API_KEY": API_KEY}, volumes,
                              predictor_spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S))
    handle = Predictor(container, http_port, grpc_port)
    try:
        wait_for(lambda: container.running() and httpx.get(f"{handle.url}/v2/health/ready", timeout=2).json()
                 == {"ready": True}, timeout=300, interval=1, what=f"the {role} container to be ready")
        yield handle
    except (TimeoutError, RuntimeError) as exc:
        pytest.fail(f"{exc}\n{container.logs()[-3000:]}")
    finally:
        container.remove()


@pytest.fixture(scope="module")
def chart() -> list[dict]:
    return helm_template()


@pytest.fixture(scope="module")
def predictor() -> Iterator[Predictor]:
    """The predictor image serving all of models/ as the chart's katonic runtime does (its image serves every
    framework: a storageUri holding a directory of packages), ready."""
    katonic = helm_template(set_values={"models[0].name": "iris", "models[0].format": "katonic",
                                        "models[0].storageUri": "pvc://kserve-classifiers-models/models",
                                        "models[0].minReplicas": "1", "models[0].maxReplicas": "1"})
    yield from start_predictor("predictor", katonic, "iris", ["--volume", f"{REPO / 'models'}:/mnt/models:ro"])


def bridge_container(chart: list[dict], *, bootstrap: str, topics: dict[str, str], grpc_target: str,
                     env: dict[str, str]) -> tuple[Container, int]:
    """The bridge image as the chart's Deployment runs it, on ``topics`` of the loopback broker."""
    pod = by_kind(chart, "Deployment")[0]["spec"]["template"]["spec"]
    spec = pod["containers"][0]
    health_port = free_port()
    args = spec["args"]
    for flag, value in {"--bootstrap-servers": bootstrap, "--request-topic": topics["requests"],
                        "--result-topic": topics["results"], "--dead-letter-topic": topics["dlq"],
                        "--group": f"ct-{uuid.uuid4().hex[:6]}", "--grpc-target": grpc_target,
                        "--health-port": str(health_port)}.items():
        args = replace_flag(args, flag, value)
    spec = {**spec, "env": [*spec.get("env", []), *({"name": k, "value": v} for k, v in env.items())]}
    container = run_container("bridge", spec, pod.get("securityContext", {}), args, {"KCP_V2_API_KEY": API_KEY},
                              [], pod["terminationGracePeriodSeconds"])
    return container, health_port
