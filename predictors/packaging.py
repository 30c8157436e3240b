"""``python -m predictors package``: a user's fitted classifier in, a checked model package out.

For a scikit-learn estimator (joblib or pickle) it reads what the estimator knows about itself
(``n_features_in_``, ``feature_names_in_``, ``classes_``, the columns a ``ColumnTransformer`` routes to
encoders), writes ``config.json`` and ``labels_file.json``, stores probe rows (from the user's data when given,
else synthesised), compiles the model to ONNX where it answers as the estimator, and finally loads the package
as the server would and predicts the probe rows. For a Keras model (``.keras``) it reads the image shape
(height, width and 1 or 3 channels) and the number of classes, and writes the preprocessing that turns an
encoded image into that input. What cannot be served as a classifier is refused with the reason.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from predictors.models.columns import ColumnBatch, Features, TabularSchema
from predictors.models.compiled import compile_checked
from predictors.models.probes import NoProbes, estimator_parts, learned_categories, save_probes, synthesize
from predictors.package import (
    FORMAT_VERSION,
    ONNX_FILE,
    LabelsFile,
    ModelPackage,
    PackageConfig,
    TensorSpec,
    load_package,
    save_package,
)

PROBE_ROWS = 512
MATRIX_INPUT = "input-0"


class PackagingError(ValueError):
    """The estimator cannot become a package; the message says why and what would do."""


@dataclass
class PackageReport:
    """What ``package`` wrote and found, printed for the user."""

    path: str
    name: str
    version: str
    inputs: list[dict[str, Any]]
    labels: list[str]
    probes: str
    runtime: str
    runtime_reason: str
    smoke: list[str] = field(default_factory=list)


def package_model(model_file: Path, out: Path, *, name: str, version: str = "1",
                  label_names: list[str] | None = None, data: Path | None = None, description: str = "",
                  force: bool = False, pixel_divisor: float = 255.0) -> PackageReport:
    """A package for a scikit-learn estimator or a Keras model, by the file's kind."""
    if model_file.suffix == ".keras":
        if data is not None:
            raise PackagingError("--data is for scikit-learn models (their columns and probe rows)")
        return package_keras(model_file, out, name=name, version=version, label_names=label_names,
                             description=description, force=force, pixel_divisor=pixel_divisor)
    return package_estimator(model_file, out, name=name, version=version, label_names=label_names, data=data,
                             description=description, force=force)


def package_keras(model_file: Path, out: Path, *, name: str, version: str = "1", label_names: list[str] | None = None,
                  description: str = "", force: bool = False, pixel_divisor: float = 255.0) -> PackageReport:
    """Write a package for the Keras image classifier in ``model_file``: input ``[-1, H, W]`` or
    ``[-1, H, W, C]`` from the model, decode → grayscale or rgb → resize → scale by ``pixel_divisor``."""
    from predictors.models.image import import_keras
    from predictors.package import DecodeStep, GrayscaleStep, ResizeStep, RGBStep, ScaleStep

    if not model_file.is_file():
        raise PackagingError(f"{model_file}: no such file")
    keras, _ = import_keras()
    try:
        model = keras.models.load_model(model_file, compile=False)
    except Exception as exc:  # Keras raises many kinds for a file that is not a model
        raise PackagingError(f"{model_file}: cannot be loaded by Keras: {type(exc).__name__}: {exc}") from exc
    shape = list(model.input_shape)
    if len(shape) not in (3, 4) or any(d is None for d in shape[1:]) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise PackagingError(f"model input {shape}: expected images [N, H, W] or [N, H, W, C] with C 1 or 3 "
                             f"and fixed H and W")
    outputs = list(model.output_shape)
    if len(outputs) != 2 or outputs[1] is None or outputs[1] < 2:
        raise PackagingError(f"model output {outputs}: expected class scores [N, K] with K >= 2")
    k = int(outputs[1])
    height, width = int(shape[1]), int(shape[2])
    channels = int(shape[3]) if len(shape) == 4 else 1
    if label_names is not None and len(label_names) != k:
        raise PackagingError(f"--labels gives {len(label_names)} names for {k} classes")
    if out.exists():
        if not force:
            raise PackagingError(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(model_file, out / "model.keras")
    config = PackageConfig(
        format_version=FORMAT_VERSION, name=name, version=version, framework="keras", task="image_classification",
        artifact="model.keras", description=description,
        inputs=[TensorSpec(name=MATRIX_INPUT, datatype="FP32",
                           shape=[-1, height, width] if channels == 1 else [-1, height, width, channels])],
        preprocessing=[DecodeStep(), GrayscaleStep() if channels == 1 else RGBStep(),
                       ResizeStep(size=max(height, width), height=height, width=width),
                       ScaleStep(divisor=pixel_divisor)])
    package = save_package(out, config, LabelsFile(labels=list(range(k)), names=label_names))
    report, served = _smoke(package, None, "synthesised images (checked at every load)")
    onnx_bytes = getattr(served, "onnx_bytes", None)
    if onnx_bytes is not None:  # the server then loads the checked graph instead of exporting it again
        (out / ONNX_FILE).write_bytes(onnx_bytes)
    return report


def package_estimator(model_file: Path, out: Path, *, name: str, version: str = "1",
                      label_names: list[str] | None = None, data: Path | None = None, description: str = "",
                      force: bool = False) -> PackageReport:
    """Write a package for the estimator pickled in ``model_file`` to ``out`` and check that it serves."""
    estimator = _load_estimator(model_file)
    _require_classifier(estimator)
    frame = _read_data(data) if data is not None else None
    inputs, feature_names = infer_inputs(estimator, frame)
    labels = _labels(estimator, label_names)
    if out.exists():
        if not force:
            raise PackagingError(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(model_file, out / "model.joblib")
    config = PackageConfig(format_version=FORMAT_VERSION, name=name, version=version, framework="sklearn",
                           task="tabular_classification", artifact="model.joblib", description=description,
                           inputs=inputs, feature_names=feature_names)
    schema = TabularSchema.of(config.inputs)
    probes, probe_source = _probes(estimator, schema, frame, config)
    if probes is not None:
        save_probes(out, probes, config.inputs[0].name)
        compilation = compile_checked(estimator, schema, probes)
        if compilation.model is not None:
            (out / ONNX_FILE).write_bytes(compilation.model.model_bytes)
    package = save_package(out, config, labels)
    return _smoke(package, probes, probe_source)[0]


def infer_inputs(estimator: Any, frame: Any | None) -> tuple[list[TensorSpec], list[str] | None]:
    """One ``[-1, F]`` matrix, or one tensor per column when the model takes named, typed columns."""
    n_features = getattr(estimator, "n_features_in_", None)
    names = getattr(estimator, "feature_names_in_", None)
    if names is None:
        if n_features is None:
            raise PackagingError("the estimator does not say how many features it takes (no n_features_in_); "
                                 "fit it on data before packaging")
        return [TensorSpec(name=MATRIX_INPUT, datatype="FP32", shape=[-1, int(n_features)])], None
    names = [str(n) for n in names]
    strings = set(learned_categories(estimator))
    if frame is not None:
        missing = [n for n in names if n not in frame.columns]
        if missing:
            raise PackagingError(f"--data lacks the model's columns {missing}")
        strings |= {n for n in names if frame[n].dtype == object or str(frame[n].dtype) in ("string", "category")}
    if not strings and not _selects_by_name(estimator):
        return [TensorSpec(name=MATRIX_INPUT, datatype="FP32", shape=[-1, len(names)])], names
    datatypes = {n: "BYTES" if n in strings else _numeric_datatype(frame, n) for n in names}
    return [TensorSpec(name=n, datatype=datatypes[n], shape=[-1]) for n in names], None


def _selects_by_name(estimator: Any) -> bool:
    """Whether a ColumnTransformer inside picks columns by name (it then needs a data frame, not a matrix)."""
    for part in estimator_parts(estimator):
        for _, _, columns in getattr(part, "transformers_", None) or []:
            if isinstance(columns, str) or (isinstance(columns, list | tuple | np.ndarray) and len(columns)
                                            and isinstance(next(iter(columns)), str)):
                return True
    return False


def _numeric_datatype(frame: Any | None, name: str) -> str:
    if frame is not None and frame[name].dtype.kind in "iu":
        return "INT64"
    return "FP64"


def _load_estimator(model_file: Path) -> Any:
    if not model_file.is_file():
        raise PackagingError(f"{model_file}: no such file")
    if model_file.suffix not in (".joblib", ".pkl", ".pickle"):
        raise PackagingError(f"{model_file}: expected a scikit-learn model saved with joblib or pickle "
                             f"(.joblib, .pkl, .pickle)")
    try:
        return joblib.load(model_file)
    except Exception as exc:  # unpickling can fail in many ways; all mean "not a model we can read"
        raise PackagingError(f"{model_file}: cannot be loaded: {type(exc).__name__}: {exc}") from exc


def _require_classifier(estimator: Any) -> None:
    from sklearn.base import is_classifier, is_clusterer, is_regressor

    kind = type(estimator).__name__
    if is_regressor(estimator):
        raise PackagingError(f"{kind} is a regressor; this platform serves classifiers")
    if is_clusterer(estimator):
        raise PackagingError(f"{kind} is a clustering model; this platform serves classifiers")
    if not is_classifier(estimator) or not hasattr(estimator, "predict_proba"):
        raise PackagingError(f"{kind} is not a classifier with predict_proba")
    classes = getattr(estimator, "classes_", None)
    if classes is None:
        raise PackagingError(f"{kind} is not fitted (no classes_)")
    if isinstance(classes, list) or np.ndim(classes) != 1:
        raise PackagingError(f"{kind} predicts several outputs at once; package one classifier per output")


def _labels(estimator: Any, label_names: list[str] | None) -> LabelsFile:
    classes = list(estimator.classes_)
    k = len(classes)
    encoded = all(isinstance(c, int | np.integer) for c in classes) and [int(c) for c in classes] == list(range(k))
    if label_names is not None:
        if not encoded:
            raise PackagingError(f"the model's classes are {classes}: they are the label names already")
        if len(label_names) != k:
            raise PackagingError(f"--labels gives {len(label_names)} names for {k} classes")
        return LabelsFile(labels=list(range(k)), names=label_names)
    return LabelsFile(labels=list(range(k)), names=None if encoded else [str(c) for c in classes])


def _read_data(data: Path) -> Any:
    import pandas as pd

    try:
        return pd.read_csv(data)
    except Exception as exc:
        raise PackagingError(f"--data {data}: not a readable CSV file: {exc}") from exc


def _probes(estimator: Any, schema: TabularSchema, frame: Any | None,
            config: PackageConfig) -> tuple[Features | None, str]:
    if frame is not None:
        rows = frame.head(PROBE_ROWS)
        if schema.matrix:
            columns = config.feature_names or list(rows.columns[:schema.n_features])
            return rows[columns].to_numpy(dtype=np.float64), f"{len(rows)} rows of the data given"
        return ColumnBatch({c.name: (rows[c.name].astype(str).to_numpy(dtype=object) if c.kind == "string"
                                     else rows[c.name].to_numpy(dtype=np.float64)) for c in schema.columns}), \
            f"{len(rows)} rows of the data given"
    try:
        return synthesize(schema, estimator), "synthesised (pass --data for rows of your own)"
    except NoProbes as exc:
        return None, f"none: {exc}"


def _smoke(package: ModelPackage, probes: Features | None, probe_source: str) -> tuple[PackageReport, Any]:
    """Load the package as the server does and predict a few probe rows; the report and the loaded model."""
    from predictors.models import ServingContext, model_for
    from predictors.settings import ServerSettings

    model = model_for(load_package(package.path), ServingContext(ServerSettings(execution_cache=None)))
    model.load()
    sample = model.sample_features() if probes is None else (
        probes.rows(0, 3) if isinstance(probes, ColumnBatch) else probes[:3])
    labels = np.asarray(model.predict_array(sample)).argmax(axis=1)
    return PackageReport(
        path=str(package.path), name=package.name, version=package.version,
        inputs=[spec.model_dump() for spec in package.config.inputs],
        labels=[package.labels.name_of(i) for i in package.labels.labels], probes=probe_source,
        runtime=model.runtime, runtime_reason=model.runtime_reason,
        smoke=[package.labels.name_of(int(i)) for i in labels]), model
