"""The feedback REST API: ground truth in, classification metrics out.

Routes (all under the router's ``dependencies``, e.g. the server's API-key check):

``POST /v2/models/{model_name}/feedback``
    Either the Katonic form ``{"predicted_label": [...], "true_label": [...]}`` (equal-length,
    non-empty lists of encoded labels) or the id form ``{"items": [{"id": "<prediction id>",
    "true_label": 2}, ...]}``, where each id is an earlier prediction's ``prediction_id`` output of this
    model (``<request id>:<server part>``, with ``/<row index>`` for the rows of a batch); the
    server then pairs the ground truth with what it really predicted. Answers the metrics of this
    submission (``batch``) and the ``cumulative`` metrics. Either form may carry a client
    ``"submission_id"``: resending the same submission under it answers the first submission
    again (``"replayed": true``, the same ``submission_id`` and ``batch``) and counts nothing twice;
    the same id with different content is a 409. Either form may carry ``"source"``: ``"api"`` (the
    default) or ``"ui"`` (the browser page marks its feedback so reports can leave it out). The
    Katonic form may name the ``"version"`` that made its predictions (default: the version served
    now); the id form takes each prediction's logged version.
``GET /v2/models/{model_name}/feedback`` (alias ``/v2/models/{model_name}/metrics/classification``)
    The cumulative metrics and those of the ``recent`` window (``?window_seconds=``, default from
    :func:`build_feedback_router`), and ``versions``: every model version's headline numbers side by
    side. ``?version=`` restricts the report to one version; ``?source=api`` (comma-separated) counts
    only those sources, ``?exclude_source=ui`` leaves sources out.
``GET /v2/models/{model_name}/feedback/compare``
    Accuracy and macro F1 per version with 95 % intervals and a verdict on the candidate against the
    baseline (``?candidate=``, default the version served now; ``?baseline=``, default the version
    before it): see :mod:`predictors.feedback.compare`. Takes the same source filters.
``GET /v2/feedback/store``
    The feedback database's state: 200 ``{"available": true, ...}``, or 503 with the last error
    while it is unreachable. Inference readiness never depends on it.

While the database is unreachable every feedback route answers 503 ``{"error": ...}`` with a
``Retry-After`` header, at once (see :class:`predictors.feedback.store.StoreUnavailable`).

Why the body is read and validated here rather than by FastAPI's parameter binding: FastAPI
answers validation failures with 422 ``{"detail": [...]}``; this API promises every client error
as ``{"error": "<one clear sentence>"}`` with the status of :mod:`predictors.protocol.errors` (400 invalid,
404 unknown model, 409 duplicate feedback, 413 too large), and nothing recorded. Labels are strict
integers: ``"1"``, ``1.5``, ``true`` and ``null`` are rejected, never coerced.

All database work runs in a worker thread (``asyncio.to_thread``): the event loop also serves
inference and health checks and must never wait on a disk or a lock.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

from predictors.feedback import prometheus
from predictors.feedback.compare import choose_versions, compare
from predictors.feedback.metrics import ClassificationMetrics, compute_metrics, confusion_from_pairs
from predictors.feedback.store import (
    MAX_ID_LENGTH,
    MAX_SUBMISSION_ID_LENGTH,
    SOURCE_API,
    SOURCES,
    DuplicateFeedback,
    FeedbackStore,
    StoreUnavailable,
    Submission,
    SubmissionIdReused,
    UnknownPredictions,
)
from predictors.package import LabelsFile
from predictors.protocol.errors import BadInput, ClientError, PayloadTooLarge, UnknownModel
from predictors.protocol.rest import JSONErrorRoute
from predictors.protocol.vocabulary import describe_validation_errors

MAX_ITEMS = 10_000
"""Most labels (Katonic form) or items (id form) in one submission."""

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body read; 10,000 id items with 256-character ids fit."""

MAX_WINDOW_SECONDS = 366 * 24 * 3600.0

MAX_VERSION_LENGTH = 64
"""Longest model version stored (the prediction log's and the feedback table's column width)."""

UNKNOWN_ID_WRITE_ALLOWANCE_S = 0.2
"""How long past one flush interval an unknown id is still looked for (another process's commit)."""
UNKNOWN_ID_POLL_S = 0.025


# --- request and response models ------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Named(_Strict):
    """The optional client ``submission_id`` that makes a resend idempotent, and where the feedback comes from."""

    submission_id: StrictStr | None = Field(default=None, min_length=1, max_length=MAX_SUBMISSION_ID_LENGTH)
    source: Literal["api", "ui"] = SOURCE_API


class KatonicFeedback(_Named):
    """``{"predicted_label": [...], "true_label": [...]}``: pairs given by the client."""

    predicted_label: list[StrictInt] = Field(min_length=1)
    true_label: list[StrictInt] = Field(min_length=1)
    version: StrictStr | None = Field(default=None, min_length=1, max_length=MAX_VERSION_LENGTH)

    @model_validator(mode="after")
    def _same_length(self) -> KatonicFeedback:
        if len(self.true_label) != len(self.predicted_label):
            raise ValueError(f"true_label has {len(self.true_label)} labels and predicted_label has "
                             f"{len(self.predicted_label)}; they must pair up one to one")
        return self


class FeedbackItem(_Strict):
    """Ground truth for one earlier prediction, named by its prediction id."""

    id: StrictStr = Field(min_length=1, max_length=MAX_ID_LENGTH)
    true_label: StrictInt


class IdFeedback(_Named):
    """``{"items": [{"id": ..., "true_label": ...}, ...]}``: the server supplies the predicted labels."""

    items: list[FeedbackItem] = Field(min_length=1)


class WindowedMetrics(ClassificationMetrics):
    """Metrics of the feedback recorded in the last ``window_seconds`` (since ``since``)."""

    window_seconds: float
    since: datetime


class FeedbackAccepted(BaseModel):
    """Answer to an accepted submission."""

    model_name: str
    submission_id: str
    accepted: int
    replayed: bool = False
    batch: ClassificationMetrics
    cumulative: ClassificationMetrics


class VersionSummary(BaseModel):
    """One model version's headline numbers, for reading versions side by side."""

    version: str
    count: int
    accuracy: float | None
    macro_f1: float
    macro_f1_all_labels: float
    weighted_f1: float


class FeedbackReport(BaseModel):
    """Answer to GET: everything stored (under the filters), the recent window, and each version."""

    model_name: str
    version: str | None
    sources: list[str]
    cumulative: ClassificationMetrics
    recent: WindowedMetrics
    versions: list[VersionSummary]


# --- errors that carry their rejection reason ------------------------------------------------


class MalformedJSON(BadInput):
    """The body is not a JSON object."""


class UnknownLabels(BadInput):
    """Labels outside labels_file.json."""


def _reason(exc: ClientError) -> str:
    """The ``reason`` label of classifier_feedback_rejected_total for an error."""
    for kind, reason in ((UnknownModel, "unknown_model"), (PayloadTooLarge, "too_large"),
                         (DuplicateFeedback, "duplicate"), (SubmissionIdReused, "duplicate"),
                         (UnknownPredictions, "unknown_id"),
                         (MalformedJSON, "malformed_json"), (UnknownLabels, "unknown_label")):
        if isinstance(exc, kind):
            return reason
    return "invalid_body"


# --- parsing ---------------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) before reading more than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_SHAPES = ('{"predicted_label": [...], "true_label": [...]} or '
           '{"items": [{"id": "<prediction id>", "true_label": <label>}, ...]}')


def parse_feedback(raw: bytes, max_items: int = MAX_ITEMS) -> KatonicFeedback | IdFeedback:
    """Validate a request body into one of the two forms, or raise a :class:`BadInput` subclass."""
    if not raw.strip():
        raise MalformedJSON(f"empty request body; send {_SHAPES}")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedJSON(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # arrays or objects nested past the parser's depth: not a feedback body
        raise MalformedJSON("request body nests too deeply to be a feedback submission") from exc
    if not isinstance(data, dict):
        raise MalformedJSON(f"request body must be a JSON object: {_SHAPES}")
    if "items" in data:
        model: type[KatonicFeedback | IdFeedback] = IdFeedback
        sizes = [data["items"]]
    elif "predicted_label" in data or "true_label" in data:
        model = KatonicFeedback
        sizes = [data.get("predicted_label"), data.get("true_label")]
    else:
        raise BadInput(f"unrecognised feedback body with keys {sorted(data)[:10]}; send {_SHAPES}")
    for value in sizes:
        if isinstance(value, list) and len(value) > max_items:
            raise PayloadTooLarge(f"{len(value)} entries in one submission exceed the limit of {max_items}")
    try:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise BadInput(f"invalid feedback: {describe_validation_errors(exc.errors(), limit=3)}") from exc
    except RecursionError as exc:
        raise MalformedJSON("request body nests too deeply to be a feedback submission") from exc


def _check_labels(model_name: str, labels: LabelsFile, field: str, values: Sequence[int]) -> None:
    k = len(labels.labels)
    bad = sorted({v for v in values if not 0 <= v < k})
    if bad:
        names = f" ({', '.join(labels.names)})" if labels.names else ""
        raise UnknownLabels(f"{field} has labels {bad[:20]} that are not in labels_file.json of model "
                            f"{model_name}: labels are 0..{k - 1}{names}")


def parse_window(value: str | None, default: float) -> float:
    """The ``window_seconds`` query parameter: a finite number of seconds in (0, one year]."""
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_WINDOW_SECONDS:
        raise BadInput(f"window_seconds must be a number of seconds greater than 0 and at most "
                       f"{MAX_WINDOW_SECONDS:.0f}, got {value!r}")
    return seconds


def parse_version(value: str | None, name: str = "version") -> str | None:
    """A model-version query parameter: absent, or 1 to :data:`MAX_VERSION_LENGTH` characters."""
    if value is None:
        return None
    if not 0 < len(value) <= MAX_VERSION_LENGTH:
        raise BadInput(f"{name} must have 1 to {MAX_VERSION_LENGTH} characters")
    return value


def parse_sources(include: str | None, exclude: str | None) -> list[str]:
    """The sources a report counts: ``?source=a,b`` (only these) minus ``?exclude_source=c``; default all."""
    def split(value: str | None, name: str) -> list[str]:
        if value is None:
            return []
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [v for v in names if v not in SOURCES]
        if unknown or not names:
            raise BadInput(f"{name} must name sources out of {list(SOURCES)}, got {value[:80]!r}")
        return names

    chosen = split(include, "source") or list(SOURCES)
    left_out = set(split(exclude, "exclude_source"))
    sources = [v for v in SOURCES if v in chosen and v not in left_out]
    if not sources:
        raise BadInput("the source filters leave no feedback to report on")
    return sources


def unavailable_response(exc: StoreUnavailable) -> JSONResponse:
    """503 with the reason and ``Retry-After`` (whole seconds, at least 1) for an unreachable store."""
    return JSONResponse({"error": exc.reason}, status_code=int(exc.status),
                        headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})


# --- the router ------------------------------------------------------------------------------


def _summary(version: str, metrics: ClassificationMetrics) -> VersionSummary:
    return VersionSummary(version=version, count=metrics.count, accuracy=metrics.accuracy,
                          macro_f1=metrics.macro_avg.f1, macro_f1_all_labels=metrics.macro_avg_all_labels.f1,
                          weighted_f1=metrics.weighted_avg.f1)


async def _add_feedback_by_ids(store: FeedbackStore, model_name: str, items: list[tuple[str, int]],
                               labels: frozenset[int], submission_id: str | None, retry_s: float,
                               source: str = SOURCE_API) -> Submission:
    """``store.add_feedback_by_ids``, waiting for ids that another process has answered but not yet written.

    Another replica's or ``--workers`` worker's write-behind log starts writing a prediction within one
    flush interval (``retry_s``) of answering it; its commit lands a little later. So an unknown id is
    looked up again after ``retry_s``, then every :data:`UNKNOWN_ID_POLL_S` until
    :data:`UNKNOWN_ID_WRITE_ALLOWANCE_S` more have passed, and only then refused: looking up once,
    exactly one interval later, races the other process's commit and refuses ids that are about to exist.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + retry_s + UNKNOWN_ID_WRITE_ALLOWANCE_S
    pause = retry_s
    while True:
        try:
            return await asyncio.to_thread(functools.partial(store.add_feedback_by_ids, model_name, items, labels,
                                                             submission_id, source=source))
        except UnknownPredictions as exc:
            if retry_s <= 0 or loop.time() >= give_up:
                young = [i for i in exc.ids if _answered_recently(i)]
                if young:  # made by this fleet moments ago: another replica's log may still be writing it
                    raise StoreUnavailable(
                        f"prediction ids {young[:5]} of model {model_name} are not in the prediction log yet; "
                        "another replica may still be writing them", YOUNG_PREDICTION_S) from exc
                raise
            await asyncio.sleep(min(pause, give_up - loop.time()))
            pause = UNKNOWN_ID_POLL_S


YOUNG_PREDICTION_S = 30.0
"""An unknown id whose request id the server made (a UUIDv7: it carries its time) less than this long ago gets
503 + Retry-After, not 400: with several replicas, the one that answered it may not have written it yet."""


def _answered_recently(prediction_id: str) -> bool:
    request_id = prediction_id.rsplit(":", 1)[0]
    try:
        parsed = uuid.UUID(request_id)
    except ValueError:
        return False
    if parsed.version != 7:
        return False
    made_ms = parsed.int >> 80
    return 0 <= time.time() * 1000 - made_ms < YOUNG_PREDICTION_S * 1000


def build_feedback_router(
    store: FeedbackStore,
    get_labels: Callable[[str], LabelsFile],
    dependencies: Sequence[Depends] = (),
    window_seconds: float = 3600.0,
    *,
    max_items: int = MAX_ITEMS,
    max_body_bytes: int = MAX_BODY_BYTES,
    flush_predictions: Callable[[], Awaitable[bool]] | None = None,
    unknown_id_retry_s: float = 0.0,
    get_version: Callable[[str], str | None] | None = None,
) -> APIRouter:
    """The feedback routes over ``store``.

    ``get_labels(model_name)`` returns the served model's labels_file.json and raises
    :class:`predictors.protocol.errors.UnknownModel` for names not served; it is called on the event loop,
    so it must not block (the server answers it from memory). ``dependencies`` (e.g. the API-key
    check) apply to every route. ``window_seconds`` is the default "recent" window of GET.
    ``flush_predictions`` (the server's write-behind prediction log) is awaited before ids are
    looked up, so feedback sent right after a response finds its prediction; when it answers
    False (the log could not write its queue) the submission gets 503 + ``Retry-After``, since
    its ids may still be queued and refusing them as unknown would lose the feedback; ids still unknown
    are looked up again from ``unknown_id_retry_s`` on (another replica's or worker's log may not have
    flushed yet) before they are refused, see :func:`_add_feedback_by_ids`. ``get_version(model_name)``
    answers the version served now (from memory, on the event loop): the Katonic form's default version
    and the comparison's default candidate. Without it the version of the model's most recently logged
    prediction stands in.
    """
    if not (math.isfinite(window_seconds) and 0 < window_seconds <= MAX_WINDOW_SECONDS):
        raise ValueError(f"window_seconds must be in (0, {MAX_WINDOW_SECONDS:.0f}], got {window_seconds}")
    default_window = float(window_seconds)
    router = APIRouter(dependencies=list(dependencies), route_class=JSONErrorRoute, tags=["feedback"])
    prometheus.watch_store(store)

    def labels_of(model_name: str, submission: bool) -> LabelsFile:
        try:
            return get_labels(model_name)
        except UnknownModel:
            if submission:  # the counter counts rejected submissions, not reads
                prometheus.observe_rejection("", "unknown_model")
            raise

    async def served_version(model_name: str) -> str | None:
        if get_version is not None:
            return get_version(model_name)
        return await asyncio.to_thread(store.latest_logged_version, model_name)

    async def update_gauges(model_name: str, labels: LabelsFile, versions: set[str]) -> None:
        """Each touched version's cumulative production metrics into the gauges."""
        def matrices() -> dict[str, np.ndarray]:
            return {v: store.confusion(model_name, labels.labels, version=v, sources=[SOURCE_API]) for v in versions}

        for version, matrix in (await asyncio.to_thread(matrices)).items():
            prometheus.set_cumulative(model_name, version, compute_metrics(matrix, labels))

    @router.post("/v2/models/{model_name}/feedback")
    async def post_feedback(model_name: str, request: Request) -> JSONResponse:
        """Record ground truth for predictions of ``model_name``; answer batch and cumulative metrics."""
        labels = labels_of(model_name, submission=True)
        try:
            body = parse_feedback(await _read_body(request, max_body_bytes), max_items)
            if isinstance(body, KatonicFeedback):
                _check_labels(model_name, labels, "true_label", body.true_label)
                _check_labels(model_name, labels, "predicted_label", body.predicted_label)
                pairs = list(zip(body.true_label, body.predicted_label, strict=True))
                version = body.version or await served_version(model_name) or ""
                submission = await asyncio.to_thread(functools.partial(
                    store.add_feedback, model_name, pairs, body.submission_id, version=version, source=body.source))
            else:
                _check_labels(model_name, labels, "true_label", [item.true_label for item in body.items])
                items = [(item.id, item.true_label) for item in body.items]
                if flush_predictions is not None and not await flush_predictions():
                    raise StoreUnavailable("recent predictions are not yet written to the feedback database (it "
                                           "was unreachable and the prediction log is catching up); retry later",
                                           store.retry_after_s)
                submission = await _add_feedback_by_ids(store, model_name, items, frozenset(labels.labels),
                                                        body.submission_id, unknown_id_retry_s, body.source)
            cumulative_matrix = await asyncio.to_thread(store.confusion, model_name, labels.labels)
            touched = set(submission.versions)
            if body.source == SOURCE_API:
                await update_gauges(model_name, labels, touched)
        except ClientError as exc:
            prometheus.observe_rejection(model_name, _reason(exc))
            raise
        except StoreUnavailable as exc:
            prometheus.observe_rejection(model_name, "unavailable")
            return unavailable_response(exc)

        batch = confusion_from_pairs(submission.pairs, len(labels.labels))
        cumulative = compute_metrics(cumulative_matrix, labels)
        if not submission.replayed:  # a resend was counted the first time
            for version in touched:
                judged = [pair for pair, v in zip(submission.pairs, submission.versions, strict=True) if v == version]
                prometheus.observe_batch(model_name, version, body.source,
                                         confusion_from_pairs(judged, len(labels.labels)), labels.labels)
        answer = FeedbackAccepted(model_name=model_name, submission_id=submission.submission_id,
                                  accepted=len(submission.pairs), replayed=submission.replayed,
                                  batch=compute_metrics(batch, labels), cumulative=cumulative)
        return JSONResponse(answer.model_dump(mode="json"))

    async def get_report(model_name: str, request: Request) -> JSONResponse:
        """Cumulative metrics and those of the recent window (under the filters), and each version's."""
        labels = labels_of(model_name, submission=False)
        query = request.query_params
        window = parse_window(query.get("window_seconds"), default_window)
        version = parse_version(query.get("version"))
        sources = parse_sources(query.get("source"), query.get("exclude_source"))
        since = datetime.now(UTC) - timedelta(seconds=window)

        def read() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
            return (store.confusion(model_name, labels.labels, version=version, sources=sources),
                    store.confusion(model_name, labels.labels, since, version=version, sources=sources),
                    store.confusion_by_version(model_name, labels.labels, sources=sources))

        try:
            total, recent, by_version = await asyncio.to_thread(read)
        except StoreUnavailable as exc:
            return unavailable_response(exc)
        report = FeedbackReport(
            model_name=model_name,
            version=version,
            sources=sources,
            cumulative=compute_metrics(total, labels),
            recent=WindowedMetrics(**dict(compute_metrics(recent, labels)), window_seconds=window, since=since),
            versions=[_summary(v, compute_metrics(m, labels)) for v, m in by_version.items()],
        )
        return JSONResponse(report.model_dump(mode="json"))

    @router.get("/v2/models/{model_name}/feedback/compare")
    async def get_comparison(model_name: str, request: Request) -> JSONResponse:
        """Accuracy and macro F1 per version with intervals, and the candidate's verdict against the baseline."""
        labels = labels_of(model_name, submission=False)
        query = request.query_params
        baseline = parse_version(query.get("baseline"), "baseline")
        candidate = parse_version(query.get("candidate"), "candidate")
        sources = parse_sources(query.get("source"), query.get("exclude_source"))
        try:
            served = await served_version(model_name)
            matrices = await asyncio.to_thread(store.confusion_by_version, model_name, labels.labels,
                                               sources=sources)
        except StoreUnavailable as exc:
            return unavailable_response(exc)
        try:
            baseline, candidate = choose_versions(list(matrices), served, baseline, candidate)
        except (LookupError, ValueError) as exc:
            raise BadInput(f"cannot compare versions of model {model_name}: {exc}") from exc
        return JSONResponse(compare(model_name, matrices, baseline, candidate).model_dump(mode="json"))

    router.add_api_route("/v2/models/{model_name}/feedback", get_report, methods=["GET"])
    router.add_api_route("/v2/models/{model_name}/metrics/classification", get_report, methods=["GET"])

    @router.get("/v2/feedback/store")
    async def store_state() -> JSONResponse:
        """The feedback database's state, checked now (at most one connection attempt per retry period)."""
        health = await asyncio.to_thread(store.check)
        return JSONResponse(
            {"backend": health.backend, "available": health.available, "since": health.since.isoformat(),
             "error": health.error},
            status_code=200 if health.available else int(StoreUnavailable.status))

    return router
