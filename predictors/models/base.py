"""The one base class every served package goes through.

KServe's ``Model.__call__`` runs ``preprocess`` → ``predict`` → ``postprocess``. Here:

* ``preprocess`` validates the V2 request against the package config and decodes it to a
  feature array (subclasses implement :meth:`PackageModel.decode_features`);
* ``predict`` runs the model off the event loop — directly in the thread pool, or through
  the adaptive :class:`~predictors.runtime.batching.Batcher` when the package enables batching;
* ``postprocess`` turns class probabilities into the V2 outputs every classifier shares
  (label, label_name, probabilities, top-k, prediction ids, echoed ids), honours the
  request's ``outputs`` field, and records predictions for later feedback.

All steps are ``async``: KServe runs a plain ``def`` step on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kserve import Model
from kserve.protocol.infer_type import InferRequest, InferResponse

from predictors.feedback.prediction_log import PredictionLog, WriteBehindLog
from predictors.models import execution
from predictors.package import ModelPackage
from predictors.protocol.codecs import as_text, to_numpy
from predictors.protocol.errors import BadInput, PayloadTooLarge
from predictors.protocol.fetch import ImageFetcher
from predictors.protocol.ids import UniqueSuffixes, uuid7
from predictors.protocol.kserve_adapter import from_kserve, to_kserve
from predictors.protocol.observability import step_series
from predictors.protocol.v2 import Output, RequestedOutput, Tensor, V2Request, V2Response, check_id
from predictors.runtime.batching import Batcher
from predictors.settings import ServerSettings

logger = logging.getLogger(__name__)

INLINE_MAX_ROWS = 64
"""Larger requests (or merged batches) of an inline model still go to the thread pool."""

IDS_INPUT = "ids"
_TOP_K_OUTPUTS = frozenset({"top_k_labels", "top_k_probabilities"})
# The request id's share of a prediction id: the server part and a batch row index must still fit the
# feedback store's 256 characters, so a longer request id is cut (the server part alone is unique).
REQUEST_ID_CHARS = 200
OUTPUTS: dict[str, tuple[str, str]] = {  # name -> (datatype, shape description)
    "label": ("INT64", "[N]"),
    "label_name": ("BYTES", "[N]"),
    "probabilities": ("FP32", "[N, K]"),
    "top_k_labels": ("INT64", "[N, k]"),
    "top_k_probabilities": ("FP32", "[N, k]"),
    "prediction_id": ("BYTES", "[N]"),
    "ids": ("BYTES", "[N]"),
}


@dataclass
class ServingContext:
    """Services shared by all models of one server."""

    settings: ServerSettings = field(default_factory=ServerSettings)
    fetcher: ImageFetcher | None = None
    prediction_log: PredictionLog | None = None
    _log_writer: WriteBehindLog | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.fetcher is None:
            self.fetcher = ImageFetcher(self.settings.fetch)

    def log_writer(self) -> WriteBehindLog | None:
        """The shared write-behind writer for the prediction log; None when logging is off."""
        if self.prediction_log is None or not self.settings.prediction_log:
            return None
        if self._log_writer is None:
            self._log_writer = WriteBehindLog(self.prediction_log,
                                              flush_interval_s=self.settings.prediction_log_flush_ms / 1000,
                                              capacity=self.settings.prediction_log_capacity)
        return self._log_writer


@dataclass(slots=True)
class Prepared:
    """What ``preprocess`` hands to ``predict``: features plus the request facts postprocess needs."""

    request: V2Request
    request_id: str
    features: Any
    n: int
    ids: list[str] | None
    stock: bool  # came through KServe's data plane: postprocess answers with KServe's InferResponse
    probabilities: np.ndarray | None = None


class PackageModel(Model):
    """A ``kserve.Model`` serving one model package; subclasses load the artifact and decode inputs."""

    inline_candidate = True
    """False for a framework whose ``predict_array`` must never run on the event loop unless config.json
    says so (it releases the GIL while computing, so the thread pool overlaps it with request handling)."""

    def __init__(self, package: ModelPackage, context: ServingContext) -> None:
        super().__init__(package.name)
        self.package = package
        self.config = package.config
        self.context = context
        self.batcher: Batcher | None = None
        self.inline_max_rows = 0  # requests up to this many rows predict on the event loop (see _decide_inline)
        self.execution = execution.ExecutionChoice("thread_pool", "not loaded")
        self.batching = execution.BatchingChoice(1, "not loaded")
        self.runtime = package.config.framework
        self.runtime_reason = "the framework's own runtime"
        # Fixed by the package: computed once, not per request.
        self._input_names = tuple(spec.name for spec in self.config.inputs)
        self._output_names = self._compute_output_names()
        self._default_outputs = [RequestedOutput(name) for name in self._output_names if name != IDS_INPUT]
        self._default_outputs_with_ids = [RequestedOutput(name) for name in self._output_names]
        self._label_names = [package.labels.name_of(label) for label in package.labels.labels]

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self) -> bool:
        """Load the artifact, check it against the package, warm it up, and start batching if enabled."""
        self.load_artifact()
        key = execution.package_key(self.name, self.config.version, self.config.framework, self.runtime,
                                    execution.file_fingerprint(self.package.artifact_path))
        self.inline_max_rows = INLINE_MAX_ROWS if self._decide_inline(key) else 0
        self.batching = self._decide_batching(key)
        size = self.batching.max_batch_size
        if size > 1:
            latency = (self.context.settings.max_latency_ms
                       if self.context.settings.max_latency_ms is not None else self.config.batching.max_latency_ms)
            self.batcher = Batcher(self.name, self.predict_array, size, latency, inline_max_rows=self.inline_max_rows)
        self.ready = True
        return self.ready

    def _decide_batching(self, key: str) -> execution.BatchingChoice:
        """The server flag, else config.json, else timing (:func:`execution.decide_batching`)."""
        if self.context.settings.max_batch_size is not None:
            return execution.BatchingChoice(self.context.settings.max_batch_size, "the server's --max_batch_size")
        rows = execution.BATCH_PROBE_ROWS
        one, merged = self.sample_features(), self.sample_batch(rows)
        choice = execution.decide_batching(
            key, lambda: self.predict_array(one), lambda: self.predict_array(merged),
            configured=self.config.batching.max_batch_size, cache=self.context.settings.execution_cache,
            never=self.batching_refusal())
        logger.info("model %s: %s (%s)", self.name, f"batching up to {choice.max_batch_size} rows"
                    if choice.max_batch_size > 1 else "no batching", choice.basis)
        return choice

    def batching_refusal(self) -> str | None:
        """Why this model's requests cannot be merged into one call, or None if they can."""
        return None

    def sample_batch(self, rows: int) -> Any:
        """``rows`` feature rows for timing a merged call: the one-row sample repeated."""
        return np.repeat(self.sample_features(), rows, axis=0)

    def _decide_inline(self, key: str) -> bool:
        """Whether ``predict`` runs on the event loop (:mod:`predictors.models.execution`); logged, and
        shown in the model metadata."""
        sample = self.sample_features()
        self.execution = execution.decide(
            key, lambda: self.predict_array(sample), override=self.config.inline_predict,
            cache=self.context.settings.execution_cache,
            never_inline=None if self.inline_candidate else f"{self.config.framework} computes outside the GIL")
        logger.info("model %s: predict runs %s (%s)", self.name,
                    "inline" if self.execution.mode == "inline" else "in the thread pool", self.execution.basis)
        return self.execution.mode == "inline"

    def properties(self) -> dict[str, str]:
        """How this model is served, for the model metadata: runtime, execution, and why."""
        props = {"runtime": self.runtime, "runtime_reason": self.runtime_reason,
                 "execution": self.execution.mode, "execution_basis": self.execution.basis,
                 "max_batch_size": str(self.config.max_batch_size)}
        props["batching"] = (f"max_batch_size {self.batcher.max_batch_size}" if self.batcher is not None
                             else "off")
        props["batching_basis"] = self.batching.basis
        return props

    def sample_features(self) -> np.ndarray:
        """A one-row feature batch of the right shape (zeros): warm-up and the inline decision use it."""
        shape = [1 if d == -1 else d for d in self.config.input.shape]
        return np.zeros(shape, dtype=np.float32 if self.config.input.datatype == "FP32" else np.float64)

    def load_artifact(self) -> None:
        raise NotImplementedError

    def validate(self, payload: Any) -> Any:
        """Validation happens in ``preprocess``; KServe's protocol checks do not apply to :class:`Prepared`."""
        return payload

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.ready = False

    def predict_array(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities [N, K] for a feature batch. Runs in a worker thread."""
        raise NotImplementedError

    # -- metadata ----------------------------------------------------------------------------

    def get_input_types(self) -> list[dict]:
        return [*({"name": spec.name, "datatype": spec.datatype, "shape": spec.shape} for spec in self.config.inputs),
                {"name": IDS_INPUT, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        k = self.package.num_classes
        top = min(self.config.postprocessing.top_k, k)
        shapes = {"probabilities": [-1, k], "top_k_labels": [-1, top], "top_k_probabilities": [-1, top]}
        return [{"name": name, "datatype": dtype, "shape": shapes.get(name, [-1])}
                for name, (dtype, _) in OUTPUTS.items() if name in self.output_names()]

    def output_names(self) -> list[str]:
        return self._output_names

    def _compute_output_names(self) -> list[str]:
        post = self.config.postprocessing
        names = ["label"]
        if post.label_names:
            names.append("label_name")
        if post.probabilities:
            names += ["probabilities", "top_k_labels", "top_k_probabilities"]
        return [*names, "prediction_id", "ids"]

    # -- request handling --------------------------------------------------------------------

    async def decode_inputs(self, by_name: dict[str, Tensor]) -> Any:
        """All input tensors (``ids`` aside) to the model's feature batch; one input by default."""
        return await self.decode_features(by_name[self._input_names[0]])

    async def decode_features(self, tensor: Tensor) -> np.ndarray:
        """Turn the main input tensor into the model's feature batch. Raise BadInput on bad data."""
        raise NotImplementedError

    async def preprocess(self, payload: V2Request | InferRequest | dict,
                         headers: dict[str, str] | None = None) -> Prepared:
        """Check the request against the package and decode it (the direct path's :class:`V2Request`,
        or KServe's ``InferRequest`` under stock ``kserve.ModelServer``)."""
        stock = isinstance(payload, InferRequest)
        if stock:
            payload = from_kserve(payload)
        elif not isinstance(payload, V2Request):
            raise BadInput("this server speaks the V2 inference protocol: POST /v2/models/{name}/infer")
        by_name: dict[str, Tensor] = {}
        for tensor in payload.inputs:
            if tensor.name in by_name:
                raise BadInput(f"input '{tensor.name}' appears twice")
            by_name[tensor.name] = tensor
        names = self._input_names
        if len(by_name) != len(names) or any(name not in by_name for name in names):
            unknown = sorted(set(by_name) - {*names, IDS_INPUT})
            if unknown:
                takes = ", ".join(f"'{name}'" for name in names)
                raise BadInput(f"unknown input(s) {unknown}; model '{self.name}' takes {takes} and optional "
                               f"'{IDS_INPUT}'")
            missing = [name for name in names if name not in by_name]
            if missing:
                raise BadInput(f"missing input{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(repr(name) for name in missing)}")
        self._check_requested_outputs(payload.outputs, IDS_INPUT in by_name)
        features = await self.decode_inputs(by_name)
        n = len(features)
        if n == 0:
            raise BadInput(f"input '{names[0]}' is an empty batch")
        if n > self.config.max_batch_size:
            raise PayloadTooLarge(f"batch of {n} exceeds this model's limit of {self.config.max_batch_size}")
        ids = self._decode_ids(by_name.get(IDS_INPUT), n)
        return Prepared(payload, payload.id or uuid7(), features, n, ids, stock)

    def _check_requested_outputs(self, requested: list[RequestedOutput] | None, has_ids: bool) -> None:
        """Refuse what postprocess could not answer before anything runs: a prediction the client gets a 400
        for must not be logged (feedback could later name a prediction nobody was told about)."""
        if not requested:
            return
        known = self.output_names()
        seen: set[str] = set()
        for out in requested:
            if out.name not in known:
                raise BadInput(f"unknown output '{out.name}'; model '{self.name}' produces {known}")
            if out.name in seen:
                raise BadInput(f"output '{out.name}' is requested twice")
            seen.add(out.name)
            if out.name == IDS_INPUT and not has_ids:
                raise BadInput(f"output '{IDS_INPUT}' needs input '{IDS_INPUT}'")

    def _decode_ids(self, tensor: Tensor | None, n: int) -> list[str] | None:
        if tensor is None:
            return None
        if tensor.datatype != "BYTES":
            raise BadInput(f"input '{IDS_INPUT}' must be BYTES, got {tensor.datatype}")
        values = to_numpy(tensor).ravel()
        if len(values) != n:
            raise BadInput(f"input '{IDS_INPUT}' has {len(values)} ids for {n} rows")
        ids = [as_text(v, IDS_INPUT) for v in values]
        if any(len(i) > 256 for i in ids):
            raise BadInput(f"input '{IDS_INPUT}': ids must be at most 256 characters")
        for i in ids:
            check_id(i, f"input '{IDS_INPUT}'")
        return ids

    async def predict(self, payload: Prepared, headers: dict[str, str] | None = None) -> Prepared:
        """Through the batcher, unless the request fills a batch by itself: merging would gain it nothing,
        and queueing it behind the batcher's one call in flight would leave the other cores idle (64-image
        requests at 4 clients: 6,300 images/s through the batcher, 9,300 without)."""
        batcher = self.batcher
        if batcher is not None and payload.n < batcher.max_batch_size:
            payload.probabilities = await batcher.submit(payload.features)
        elif payload.n <= self.inline_max_rows:
            payload.probabilities = self.predict_array(payload.features)
        else:
            loop = asyncio.get_running_loop()
            payload.probabilities = await loop.run_in_executor(None, self.predict_array, payload.features)
        return payload

    async def postprocess(self, result: Prepared, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> V2Response | InferResponse:
        """The V2 outputs (all, or the ones the request names, in its order), after queueing the predictions
        for the log. KServe's ``InferResponse`` when the request came through KServe's data plane."""
        probs = np.asarray(result.probabilities, dtype=np.float32)
        labels = probs.argmax(axis=1).astype(np.int64)
        prediction_id = f"{result.request_id[:REQUEST_ID_CHARS]}:{_IDS.next()}"
        prediction_ids = [prediction_id] if result.n == 1 else [f"{prediction_id}/{i}" for i in range(result.n)]
        await self._log_predictions(prediction_ids, labels)
        request = result.request
        wanted = request.outputs or (self._default_outputs_with_ids if result.ids else self._default_outputs)
        top = None
        if any(name.name in _TOP_K_OUTPUTS for name in wanted):  # once for both top-k outputs, vectorised
            k = min(self.config.postprocessing.top_k, probs.shape[1])
            top_labels = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            top = (top_labels, probs[np.arange(len(probs))[:, None], top_labels])
        outputs = [self._output(name.name, request.output_is_binary(name), probs, labels, prediction_ids, result.ids,
                                top) for name in wanted]
        response = V2Response(result.request_id, self.name, self.config.version, outputs)
        return to_kserve(response, request) if result.stock else response

    async def infer(self, request: V2Request) -> V2Response:
        """The direct path (:mod:`predictors.protocol.v2`): the three hooks, without KServe's data plane around them,
        each timed into ``classifier_request_*_seconds{model,version}`` (KServe's data plane would have timed them
        into its own histograms); a failed step records nothing, the request counters count the failure."""
        pre, pred, post = step_series(self.name, self.config.version)
        t0 = time.perf_counter()
        prepared = await self.preprocess(request)
        t1 = time.perf_counter()
        result = await self.predict(prepared)
        t2 = time.perf_counter()
        response = await self.postprocess(result)
        t3 = time.perf_counter()
        pre.observe(t1 - t0)
        pred.observe(t2 - t1)
        post.observe(t3 - t2)
        return response

    def _output(self, name: str, binary: bool, probs: np.ndarray, labels: np.ndarray, prediction_ids: list[str],
                ids: list[str] | None, top: tuple[np.ndarray, np.ndarray] | None) -> Output:
        n = len(labels)
        if name == "label":
            return Output(name, "INT64", [n], labels, binary)
        if name == "label_name":
            names = self._label_names
            return Output(name, "BYTES", [n], [names[i] for i in labels.tolist()], binary)
        if name == "probabilities":
            return Output(name, "FP32", list(probs.shape), probs, binary)
        if name == "prediction_id":
            return Output(name, "BYTES", [n], prediction_ids, binary)
        if name == IDS_INPUT:
            if ids is None:
                raise BadInput(f"output '{name}' needs input '{IDS_INPUT}'")
            return Output(name, "BYTES", [n], ids, binary)
        assert top is not None  # postprocess computes it when a top-k output is wanted
        top_labels, top_probs = top
        k = top_labels.shape[1]
        if name == "top_k_labels":
            return Output(name, "INT64", [n, k], top_labels.astype(np.int64), binary)
        return Output(name, "FP32", [n, k], top_probs, binary)

    async def _log_predictions(self, prediction_ids: list[str], labels: np.ndarray) -> None:
        """Queue predictions for the write-behind log (:mod:`predictors.feedback.prediction_log`): the response
        does not wait for the database; feedback on this server flushes the queue first."""
        writer = self.context.log_writer()
        if writer is None:
            return
        rows = list(zip(prediction_ids, labels.tolist(), strict=True))
        try:
            await writer.record(self.name, self.config.version, rows)
        except Exception:  # a logging failure must not fail the prediction
            logger.exception("could not record predictions for model %s", self.name)


_IDS = UniqueSuffixes()
