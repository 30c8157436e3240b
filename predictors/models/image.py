"""tf.keras image classifiers whose input handling is driven by the package's config.

The package declares the image ``[-1, H, W]`` (grayscale) or ``[-1, H, W, C]`` (C = 1 or 3). Accepted for
the main input, in one request:

* FP32/FP64 ``[N, H, W, C]`` (``[N, H, W]`` when C is 1) already in the model's [0, 1] scale;
* UINT8 of the same shapes in 0..255 (scaled by the package's ``scale`` step);
* BYTES ``[N]`` (or ``[N, 1]``) holding encoded PNG/JPEG images — raw bytes over gRPC
  and binary REST, base64 strings in REST JSON — or ``http(s)`` URLs, fetched behind the
  network guard. Encoded images go through the package's preprocessing pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from predictors.models.base import PackageModel
from predictors.models.keras_compiled import compile_keras
from predictors.models.preprocessing import DecodeBudget, pixel_divisor, run_image_pipeline
from predictors.package import ONNX_FILE, PackageError
from predictors.protocol.codecs import bytes_element, element_count, require_finite, to_numpy
from predictors.protocol.errors import BadInput, InvalidImage, PayloadTooLarge
from predictors.protocol.v2 import Tensor

logger = logging.getLogger(__name__)

MAX_CONCURRENT_FETCHES = 8
TF_THREADS = 1
"""TensorFlow's intra- and inter-op pool sizes in the server, unless ``TF_NUM_INTRAOP_THREADS`` /
``TF_NUM_INTEROP_THREADS`` are set. One thread each: a served model gets small batches, where a second
compute thread costs more CPU in hand-offs and spinning than it saves, and the other cores are busy with
the event loop, gRPC and the clients."""
ONEDNN_OPTS = "1"
"""``TF_ENABLE_ONEDNN_OPTS`` unless set: this TensorFlow build leaves oneDNN's kernels off by default, and
the image models need less CPU per image with them (bench/images.py measures it)."""


def import_keras() -> tuple[Any, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", ONEDNN_OPTS)  # read once, when TensorFlow loads
    import keras
    import tensorflow as tf

    try:
        if "TF_NUM_INTRAOP_THREADS" not in os.environ:
            tf.config.threading.set_intra_op_parallelism_threads(TF_THREADS)
        if "TF_NUM_INTEROP_THREADS" not in os.environ:
            tf.config.threading.set_inter_op_parallelism_threads(TF_THREADS)
    except RuntimeError:  # TensorFlow already ran something in this process (a test session): keep its pools
        pass
    return keras, tf


class ImageModel(PackageModel):
    """Serves a ``model.keras`` classifier through a compiled ``tf.function`` (not ``model.predict``)."""

    # TensorFlow releases the GIL while it computes: in the thread pool that overlaps with the event
    # loop reading the next requests (which become the next batch); inline it would stall them.
    inline_candidate = False

    def load_artifact(self) -> None:
        keras, tf = import_keras()
        model = keras.models.load_model(self.package.artifact_path, compile=False)
        self.package.check_artifact(model)
        self.keras_model = model
        self.model_input_shape = tuple(model.input_shape[1:])
        signature = tf.TensorSpec(shape=(None, *self.model_input_shape), dtype=tf.float32)
        # One concrete function for every batch size (the batch dimension is None): no retracing, and a
        # call skips the polymorphic function's argument binding and trace lookup.
        concrete = tf.function(lambda x: model(x, training=False), input_signature=[signature]).get_concrete_function()
        to_tensor = tf.convert_to_tensor

        def through_tensorflow(x: np.ndarray) -> np.ndarray:
            return concrete(to_tensor(x)).numpy()

        self._serve: Callable[[np.ndarray], np.ndarray] = through_tensorflow
        shape = self.config.image_shape or self.model_input_shape
        self.image_shape = shape[:2] if len(shape) == 3 and shape[2] == 1 else tuple(shape)
        self.runtime, self.runtime_reason = "keras", "runtime: keras in config.json"
        if self.config.runtime != "keras":
            self._compile(model, through_tensorflow)
        self.predict_array(np.zeros((1, *self.image_shape), dtype=np.float32))  # warm up

    def _compile(self, model: Any, through_tensorflow: Callable[[np.ndarray], np.ndarray]) -> None:
        """Serve the model compiled to ONNX when it answers as TensorFlow does (:mod:`.keras_compiled`)."""
        model(np.zeros((1, *self.model_input_shape), dtype=np.float32))  # Keras exports only a model that ran
        stored = self.package.path / ONNX_FILE
        compilation = compile_keras(model, through_tensorflow, self.model_input_shape,
                                    threads=self.context.settings.model_threads,
                                    model_bytes=stored.read_bytes() if stored.is_file() else None)
        if compilation.model is not None:
            self._serve = compilation.model
            self.onnx_bytes = compilation.model.model_bytes
            self.runtime, self.runtime_reason = "onnxruntime", compilation.reason
        elif self.config.runtime == "onnx":
            raise PackageError(self.package.path, "config.json", "runtime",
                               f"runtime 'onnx' asked for, but the model does not compile: {compilation.reason}")
        else:
            self.runtime_reason = f"served by TensorFlow: {compilation.reason}"
            logger.warning("model %s: not compiled, %s", self.name, self.runtime_reason)

    def sample_features(self) -> np.ndarray:
        return np.zeros((1, *self.image_shape), dtype=np.float32)

    def predict_array(self, features: np.ndarray) -> np.ndarray:
        x = features.reshape((len(features), *self.model_input_shape)).astype(np.float32, copy=False)
        return self._serve(x)

    async def decode_features(self, tensor: Tensor) -> np.ndarray:
        if tensor.datatype == "BYTES":
            return await self._decode_encoded(tensor)
        if tensor.datatype not in ("FP32", "FP64", "UINT8"):
            raise BadInput(f"input '{tensor.name}' must be FP32, UINT8 or BYTES (encoded images or URLs), "
                           f"got {tensor.datatype}")
        array = to_numpy(tensor)
        shape = self.image_shape
        if len(shape) == 2 and array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != len(shape) + 1 or array.shape[1:] != shape:
            wanted = [f"[N, {', '.join(map(str, shape))}]"] + ([f"[N, {shape[0]}, {shape[1]}, 1]"] if len(shape) == 2
                                                                else [])
            raise BadInput(f"input '{tensor.name}' must have shape {' or '.join(wanted)}, got {list(tensor.shape)}")
        if tensor.datatype == "UINT8":
            return array.astype(np.float32) / np.float32(pixel_divisor(self.config.preprocessing))
        # Two reductions check both rules: min and max propagate NaN, and NaN or ±inf fail the range test.
        if array.size and not (array.min() >= 0.0 and array.max() <= 1.0):
            require_finite(array, tensor.name)
            raise BadInput(f"input '{tensor.name}': {tensor.datatype} pixels must be in [0, 1]; send UINT8 for 0..255")
        return array.astype(np.float32, copy=False)

    async def _decode_encoded(self, tensor: Tensor) -> np.ndarray:
        shape = list(tensor.shape)
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise BadInput(f"BYTES input '{tensor.name}' must have shape [N] or [N, 1], got {shape}")
        limits = self.context.settings.images
        count = element_count(shape)
        if count > self.config.max_batch_size:
            raise PayloadTooLarge(f"batch of {count} exceeds this model's limit of {self.config.max_batch_size}")
        if count > limits.max_images:
            raise PayloadTooLarge(f"{count} encoded images in one request; the limit is {limits.max_images}")
        values = to_numpy(tensor).ravel()
        items = [bytes_element(v, tensor.name, i) for i, v in enumerate(values)]
        images = await self._fetch_urls(items, tensor.name)
        steps = self.config.preprocessing
        loop = asyncio.get_running_loop()

        def decode_all() -> np.ndarray:
            budget = DecodeBudget(limits.max_pixels, limits.max_total_pixels, limits.decode_deadline_s)
            out = np.empty((len(images), *self.image_shape), dtype=np.float32)
            for i, data in enumerate(images):
                try:
                    pixels = run_image_pipeline(data, steps, budget)
                except (InvalidImage, PayloadTooLarge) as exc:
                    raise type(exc)(f"input '{tensor.name}' element {i}: {exc.reason}") from exc
                if pixels.shape != self.image_shape:
                    raise InvalidImage(f"input '{tensor.name}' element {i}: the package pipeline produced "
                                       f"{list(pixels.shape)}, the model takes {list(self.image_shape)}")
                out[i] = pixels
            return out

        async with _decode_slots(limits.decode_slots):
            return await loop.run_in_executor(None, decode_all)

    async def _fetch_urls(self, items: list[bytes | str], name: str) -> list[bytes]:
        """Fetch the URL elements (the others are image bytes already), all under one byte budget; the
        first failure cancels the fetches still running, since the request fails anyway."""
        if not any(isinstance(item, str) for item in items):
            return items  # type: ignore[return-value]
        fetcher = self.context.fetcher
        assert fetcher is not None
        gate = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)
        budget = fetcher.budget()

        async def one(i: int, item: bytes | str) -> bytes:
            if isinstance(item, bytes):
                return item
            async with gate:
                try:
                    return await fetcher.fetch(item, budget)
                except BadInput as exc:
                    raise type(exc)(f"input '{name}' element {i}: {exc.reason}") from exc

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i, it)) for i, it in enumerate(items)]
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None
        return [task.result() for task in tasks]


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to answer with from a failed task group: a client error if any task had one."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return next((e for e in leaves if isinstance(e, BadInput)), leaves[0])


_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _decode_slots(slots: int) -> asyncio.Semaphore:
    """The server-wide gate on requests decoding images at once (one per event loop: the server has one)."""
    loop = asyncio.get_running_loop()
    gate = _SLOTS.get(loop)
    if gate is None:
        gate = _SLOTS[loop] = asyncio.Semaphore(slots)
    return gate
