"""The model-package format: the one contract between ``training/`` and ``predictors/``.

A model package is a directory::

    <name>/
        config.json        PackageConfig (this module), format_version 1
        labels_file.json   LabelsFile: {"labels": [encoded ids], "names": [...]}
        model.joblib | model.keras | launch.py   the artifact named in config.json
        metrics.json       test-set evaluation written by training (optional to serve)
        *.png              plots (optional)

Training writes packages with :func:`save_package`; the server reads them with
:func:`load_package`. Both go through the pydantic models below, so a package that
validates here loads in the server, in a test and in the cluster alike. Every
failure raises :class:`PackageError` naming the offending file and field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
LABELS_FILE = "labels_file.json"
METRICS_FILE = "metrics.json"
ONNX_FILE = "model.onnx"  # a scikit-learn model compiled at packaging (optional: the server compiles at load)
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"  # a DNS label: also a valid InferenceService name

Task = Literal["tabular_classification", "image_classification"]
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                   "FP16", "FP32", "FP64", "BYTES"]



@dataclass(frozen=True)
class FrameworkSpec:
    """What a ``framework`` in config.json means: its artifact file, the tasks it can serve, its predictor.

    ``model_class`` is ``"module:Class"``, a :class:`predictors.models.PackageModel` subclass,
    imported only when a package of this framework is served (TensorFlow is heavy).
    """

    artifact: str
    tasks: frozenset[str]
    model_class: str


FRAMEWORKS: dict[str, FrameworkSpec] = {
    "sklearn": FrameworkSpec("model.joblib", frozenset({"tabular_classification"}),
                             "predictors.models.tabular:TabularModel"),
    "keras": FrameworkSpec("model.keras", frozenset({"image_classification"}), "predictors.models.image:ImageModel"),
    "katonic": FrameworkSpec("launch.py", frozenset({"tabular_classification", "image_classification"}),
                             "predictors.models.katonic:KatonicModel"),
}
"""The framework registry. Adding a framework: one module with a ``PackageModel`` subclass, one line here."""


class PackageError(ValueError):
    """A package is missing, malformed or inconsistent. ``file`` and ``field`` say where."""

    def __init__(self, package: Path | str, file: str, field: str | None, message: str) -> None:
        self.package = str(package)
        self.file = file
        self.field = field
        self.message = message
        where = f"{file}" + (f": field '{field}'" if field else "")
        super().__init__(f"model package {self.package}: {where}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One V2 tensor: name, datatype and shape; -1 marks a variable dimension (the batch)."""

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[int] = Field(min_length=1)

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        if any(d == 0 or d < -1 for d in shape):
            raise ValueError("dimensions must be positive or -1 (variable)")
        return shape


# --- preprocessing steps: each names one pure function in predictors.models.preprocessing -------------


class DecodeStep(_Strict):
    """Decode encoded image bytes (PNG/JPEG/...) into pixels, with size limits."""

    op: Literal["decode"] = "decode"
    max_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=40_000_000, gt=0)


class GrayscaleStep(_Strict):
    """Convert RGB/RGBA/palette images to one luminance channel; alpha composites on white."""

    op: Literal["grayscale"] = "grayscale"


class AutoInvertStep(_Strict):
    """Make the image light-on-dark (MNIST polarity) if its border is mostly light."""

    op: Literal["auto_invert"] = "auto_invert"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)


class CropToInkStep(_Strict):
    """Crop to the bounding box of pixels brighter than ``threshold`` (0..1 of max)."""

    op: Literal["crop_to_ink"] = "crop_to_ink"
    threshold: float = Field(default=0.2, ge=0.0, le=1.0)


class FitStep(_Strict):
    """Resize keeping aspect ratio so the longer side is ``size`` pixels."""

    op: Literal["fit"] = "fit"
    size: int = Field(default=20, gt=0)


class CenterOfMassStep(_Strict):
    """Paste into a ``size``×``size`` canvas with the centre of mass in the middle (how MNIST was built)."""

    op: Literal["center_of_mass"] = "center_of_mass"
    size: int = Field(default=28, gt=0)


class ResizeStep(_Strict):
    """Plain resize to ``height``×``width`` (``size``×``size`` when not given), for data sets such as
    Fashion-MNIST that are not centred by mass, and for colour photos."""

    op: Literal["resize"] = "resize"
    size: int = Field(default=28, gt=0)
    height: int | None = Field(default=None, gt=0)
    width: int | None = Field(default=None, gt=0)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height or self.size, self.width or self.size)


class RGBStep(_Strict):
    """Three colour channels (red, green, blue); transparency composites on white."""

    op: Literal["rgb"] = "rgb"


class ScaleStep(_Strict):
    """Scale pixel values: ``x / divisor`` as float32."""

    op: Literal["scale"] = "scale"
    divisor: float = Field(default=255.0, gt=0)


PreprocessStep = Annotated[
    DecodeStep | GrayscaleStep | RGBStep | AutoInvertStep | CropToInkStep | FitStep | CenterOfMassStep | ResizeStep
    | ScaleStep,
    Field(discriminator="op"),
]


class Postprocessing(_Strict):
    """How predictions are reported: top-k classes, full probabilities, label names."""

    top_k: int = Field(default=3, ge=1)
    probabilities: bool = True
    label_names: bool = True


class Batching(_Strict):
    """Adaptive batching of concurrent requests; ``max_batch_size`` 1 disables it, unset (null) lets the
    server decide from timed calls at load (:mod:`predictors.models.execution`)."""

    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    max_latency_ms: float = Field(default=5.0, ge=0.0, le=10_000.0)


class PackageConfig(_Strict):
    """``config.json``: everything the server needs to serve the artifact."""

    format_version: int
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._+-]+$")
    framework: str
    task: Task
    artifact: str = Field(min_length=1)
    description: str = ""
    inputs: list[TensorSpec] = Field(min_length=1)
    feature_names: list[str] | None = None
    preprocessing: list[PreprocessStep] = Field(default_factory=list)
    postprocessing: Postprocessing = Field(default_factory=Postprocessing)
    batching: Batching = Field(default_factory=Batching)
    inline_predict: bool | None = Field(
        default=None, description="run predict on the event loop (true) or in a worker thread (false); "
                                  "unset: the server decides by timing a one-row call at load")
    max_batch_size: int = Field(default=256, ge=1, description="largest N accepted in one request")
    runtime: Literal["auto", "onnx", "sklearn", "keras"] = Field(
        default="auto", description="'auto' serves the model compiled to ONNX when it answers as the original on "
                                    "probe inputs, else the framework's own runtime; 'onnx' requires the compiled "
                                    "model; 'sklearn' or 'keras' (the package's framework) never compiles")

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"unknown format_version {v}; this server reads version {FORMAT_VERSION}")
        return v

    @field_validator("artifact")
    @classmethod
    def _plain_file_name(cls, v: str) -> str:
        if "/" in v or "\\" in v or v in (".", ".."):
            raise ValueError("must be a file name inside the package, not a path")
        return v

    @field_validator("framework")
    @classmethod
    def _known_framework(cls, v: str) -> str:
        if v not in FRAMEWORKS:
            raise ValueError(f"unknown framework '{v}'; this server serves {', '.join(sorted(FRAMEWORKS))}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PackageConfig:
        spec = FRAMEWORKS[self.framework]
        if self.task not in spec.tasks:
            raise ValueError(f"framework '{self.framework}' cannot serve task '{self.task}'; it serves "
                             f"{', '.join(sorted(spec.tasks))}")
        if self.runtime in ("sklearn", "keras") and self.runtime != self.framework:
            raise ValueError(f"runtime '{self.runtime}' is not this package's framework ('{self.framework}')")
        if self.runtime == "onnx" and self.framework == "katonic":
            raise ValueError("a Katonic package runs its own code: runtime 'onnx' does not apply")
        expected = spec.artifact
        if self.artifact != expected:
            raise ValueError(f"framework '{self.framework}' expects artifact '{expected}', got '{self.artifact}'")
        if self.task == "tabular_classification":
            if len(self.inputs) > 1:
                self._check_columns()
            n = self.inputs[0].shape[-1] if len(self.inputs) == 1 else len(self.inputs)
            if self.feature_names is not None and len(self.feature_names) != n:
                raise ValueError(f"feature_names has {len(self.feature_names)} names for {n} input features")
        elif len(self.inputs) > 1:
            raise ValueError("an image model takes one input")
        elif self.task == "image_classification" and self.framework != "katonic":
            self._check_image()
        return self

    def _check_image(self) -> None:
        """An image input is ``[-1, H, W]`` (grayscale) or ``[-1, H, W, C]`` with 1 or 3 channels; colour
        images take only the steps that work on any number of channels."""
        shape = self.inputs[0].shape
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
            raise ValueError(f"an image input has shape [-1, H, W] or [-1, H, W, C] with C 1 or 3, got {shape}")
        if self.channels == 3:
            grayscale_only = sorted({s.op for s in self.preprocessing} & {"grayscale", "auto_invert", "crop_to_ink",
                                                                         "fit", "center_of_mass"})
            if grayscale_only:
                raise ValueError(f"steps {grayscale_only} work on one channel; this model takes 3")
            if self.preprocessing and not any(s.op == "rgb" for s in self.preprocessing):
                raise ValueError("a 3-channel model's preprocessing needs an 'rgb' step after 'decode'")

    def _check_columns(self) -> None:
        """Several inputs are the columns of a table: one 1-D tensor each, uniquely named, no 'ids'."""
        names = [spec.name for spec in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError("input names must be unique")
        if "ids" in names:
            raise ValueError("'ids' is reserved for the request's row ids")
        for spec in self.inputs:
            if spec.shape not in ([-1], [-1, 1]):
                raise ValueError(f"input '{spec.name}': a column has shape [-1] or [-1, 1], got {spec.shape}")
        if (self.batching.max_batch_size or 1) > 1:
            raise ValueError("batching merges one feature matrix; a model with column inputs takes max_batch_size 1")

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def image_size(self) -> int | None:
        """Height of the image the model takes (its side, when square); None for tabular models."""
        if self.task != "image_classification":
            return None
        return self.inputs[0].shape[1]

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """``(H, W)`` for a grayscale input declared ``[-1, H, W]``, else ``(H, W, C)``; None for tabular."""
        if self.task != "image_classification" or len(self.inputs[0].shape) < 3:
            return None
        return tuple(self.inputs[0].shape[1:])

    @property
    def channels(self) -> int:
        shape = self.inputs[0].shape
        return shape[3] if len(shape) == 4 else 1


class LabelsFile(_Strict):
    """``labels_file.json`` in the Katonic format (encoded class ids) plus human-readable names."""

    labels: list[int] = Field(min_length=2)
    names: list[str] | None = None

    # Field validators (not one model validator) so a PackageError names the field: 'labels' or 'names'.
    @field_validator("labels")
    @classmethod
    def _encoded_ids(cls, labels: list[int]) -> list[int]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        if labels != list(range(len(labels))):
            raise ValueError("labels must be the encoded class ids 0..K-1 in order")
        return labels

    @field_validator("names")
    @classmethod
    def _one_name_per_label(cls, names: list[str] | None, info: ValidationInfo) -> list[str] | None:
        labels = info.data.get("labels")
        if names is not None and labels is not None and len(names) != len(labels):
            raise ValueError(f"names has {len(names)} entries for {len(labels)} labels")
        return names

    def name_of(self, label: int) -> str:
        return self.names[label] if self.names else str(label)


class ModelPackage(BaseModel):
    """A validated package on disk."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    config: PackageConfig
    labels: LabelsFile
    metrics: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def artifact_path(self) -> Path:
        return self.path / self.config.artifact

    @property
    def num_classes(self) -> int:
        return len(self.labels.labels)

    def check_artifact(self, model: Any) -> None:
        """Fail with a PackageError if a loaded artifact disagrees with config/labels."""
        check_artifact(self, model)


# --- reading and writing ----------------------------------------------------------------------


def _read_json(package: Path, file: str) -> Any:
    path = package / file
    if not path.is_file():
        raise PackageError(package, file, None, "file is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(package, file, None, f"not valid JSON: {exc}") from exc


def _validate(package: Path, file: str, model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        raise PackageError(package, file, field, err["msg"]) from exc


def load_package(path: str | Path) -> ModelPackage:
    """Read and validate a package directory (not the artifact itself; see :func:`check_artifact`)."""
    package = Path(path)
    if not package.is_dir():
        raise PackageError(package, ".", None, "package directory does not exist")
    config: PackageConfig = _validate(package, CONFIG_FILE, PackageConfig, _read_json(package, CONFIG_FILE))
    labels: LabelsFile = _validate(package, LABELS_FILE, LabelsFile, _read_json(package, LABELS_FILE))
    if not (package / config.artifact).is_file():
        raise PackageError(package, config.artifact, None, "artifact named in config.json 'artifact' is missing")
    metrics = _read_json(package, METRICS_FILE) if (package / METRICS_FILE).is_file() else None
    return ModelPackage(path=package, config=config, labels=labels, metrics=metrics)


def save_package(
    path: str | Path,
    config: PackageConfig,
    labels: LabelsFile,
    metrics: dict[str, Any] | None = None,
) -> ModelPackage:
    """Write config, labels and metrics next to an artifact the caller has already saved in ``path``."""
    package = Path(path)
    package.mkdir(parents=True, exist_ok=True)
    (package / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")
    (package / LABELS_FILE).write_text(labels.model_dump_json(indent=2, exclude_none=True) + "\n", encoding="utf-8")
    if metrics is not None:
        (package / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return load_package(package)


def discover_packages(model_dir: str | Path) -> list[Path]:
    """Package directories directly under ``model_dir`` (those holding a config.json), sorted by name."""
    root = Path(model_dir)
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())


# --- artifact consistency ---------------------------------------------------------------------


def _shape_matches(expected: Sequence[int], actual: Sequence[int | None]) -> bool:
    if len(expected) != len(actual):
        return False
    return all(e == -1 or a is None or e == a for e, a in zip(expected, actual, strict=True))


def _same_classes(classes: list[Any], labels: LabelsFile) -> bool:
    """The estimator's classes are the encoded ids 0..K-1, or (in that order) the labels file's names."""
    if all(isinstance(c, int | np.integer) for c in classes):
        return [int(c) for c in classes] == labels.labels
    return labels.names is not None and [str(c) for c in classes] == labels.names


def check_artifact(package: ModelPackage, model: Any) -> None:
    """Compare a loaded artifact with the package's config and labels.

    scikit-learn: ``n_features_in_`` and ``classes_``; Keras: input shape and output units.
    Katonic artifacts are user code and are checked by calling them, not here.
    """
    cfg = package.config
    art = cfg.artifact
    if cfg.framework == "sklearn":
        n_features = getattr(model, "n_features_in_", None)
        declared = cfg.input.shape[-1] if len(cfg.inputs) == 1 else len(cfg.inputs)
        if n_features is not None and n_features != declared:
            raise PackageError(package.path, CONFIG_FILE, "inputs.0.shape" if len(cfg.inputs) == 1 else "inputs",
                               f"model {art} takes {n_features} features, config says {declared}")
        names_in = getattr(model, "feature_names_in_", None)
        if len(cfg.inputs) > 1 and names_in is not None and list(names_in) != [s.name for s in cfg.inputs]:
            raise PackageError(package.path, CONFIG_FILE, "inputs",
                               f"model {art} takes columns {list(names_in)}, config lists "
                               f"{[s.name for s in cfg.inputs]}")
        classes = getattr(model, "classes_", None)
        if classes is not None and not _same_classes(list(classes), package.labels):
            raise PackageError(package.path, LABELS_FILE, "labels",
                               f"model {art} predicts classes {list(classes)}, "
                               f"labels file lists {package.labels.labels}")
        if not hasattr(model, "predict_proba"):
            raise PackageError(package.path, art, None, "scikit-learn model has no predict_proba")
    elif cfg.framework == "keras":
        in_shape = list(model.input_shape)
        want = [d if i else -1 for i, d in enumerate(cfg.input.shape)]
        if len(want) == len(in_shape) - 1:  # config [N,28,28] vs model [N,28,28,1]: channel added by the server
            want = [*want, 1]
        if not _shape_matches(want, in_shape):
            raise PackageError(package.path, CONFIG_FILE, "inputs.0.shape",
                               f"model {art} takes input shape {in_shape}, config says {cfg.input.shape}")
        units = model.output_shape[-1]
        if units != package.num_classes:
            raise PackageError(package.path, LABELS_FILE, "labels",
                               f"model {art} has {units} outputs, labels file lists {package.num_classes} labels")
