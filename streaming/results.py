"""The results consumer: print each prediction, and optionally score it with feedback.

Results arrive at least once, so the same request id can appear twice; the printer counts and
drops duplicates by id (the behaviour every downstream consumer should copy).

With ``--feedback`` the true label carried through the pipeline (from the request's ``label`` /
``true_label``) is sent in batches to the model server's ``POST /v2/models/{model}/feedback``.
When the result carries the server's ``prediction_id`` output (this project's server does), the
feedback names the prediction -- ``{"items": [{"id": ..., "true_label": ...}]}`` -- and the server
pairs the truth with what it really predicted and logged. Otherwise (or if the server rejects the
ids, e.g. with its prediction log off) the pairs form ``{"predicted_label", "true_label"}`` is
sent -- except on 409 (feedback for those ids already recorded), where resending would count
twice. The server's answers and a local accuracy tally form the report printed at the end.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

from streaming.messenger import Message, Messenger

log = logging.getLogger(__name__)


def output(doc: dict[str, Any], name: str) -> list[Any] | None:
    for o in doc.get("outputs") or []:
        if isinstance(o, dict) and o.get("name") == name:
            return o.get("data")
    return None


def predicted_label(doc: dict[str, Any]) -> int | None:
    """The first ``label`` element, else the argmax of ``probabilities``."""
    labels = output(doc, "label")
    if labels:
        return int(labels[0])
    probs = output(doc, "probabilities")
    if probs:
        outputs = {o["name"]: o for o in doc["outputs"]}
        width = outputs["probabilities"]["shape"][-1]
        row = probs[:width]
        return int(max(range(len(row)), key=row.__getitem__))
    return None


def format_result(doc: dict[str, Any]) -> str:
    """``<id>  <model>:<version>  -> <label_name> (<label>) p=<max prob>  true=<label> ok|WRONG``."""
    label = predicted_label(doc)
    names = output(doc, "label_name")
    probs = output(doc, "probabilities")
    text = f"{doc.get('id')}  {doc.get('model_name')}:{doc.get('model_version') or '-'}  -> "
    text += f"{names[0]} ({label})" if names else f"{label}"
    if probs and label is not None:
        width = next(o for o in doc["outputs"] if o.get("name") == "probabilities")["shape"][-1]
        text += f" p={max(probs[:width]):.3f}"
    true = doc.get("true_label")
    if true is not None:
        mark = "ok" if label is not None and int(true) == label else "WRONG"
        text += f"  true={true} {mark}"
    if doc.get("image_id"):
        text += f"  [{doc['image_id']}]"
    return text


@dataclass
class Report:
    """What the results run saw."""

    results: int = 0
    duplicates: int = 0
    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    labelled: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    feedback_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    feedback_responses: dict[str, Any] = field(default_factory=dict)
    feedback_errors: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"results: {self.results} unique, {self.duplicates} duplicate(s) dropped"]
        for model in sorted(self.labelled):
            n, ok = self.labelled[model], self.correct[model]
            out.append(f"  {model}: accuracy {ok}/{n} = {ok / n:.3f} (local tally)")
        for model in sorted(self.feedback_sent):
            out.append(f"  {model}: feedback sent for {self.feedback_sent[model]}; server: "
                       f"{summarise_feedback(self.feedback_responses.get(model))}")
        out += [f"  feedback error: {e}" for e in self.feedback_errors]
        return out


def summarise_feedback(response: Any) -> str:
    """One line from the feedback API's answer: cumulative accuracy and count when it reports them."""
    if isinstance(response, dict) and isinstance(response.get("cumulative"), dict):
        cum = response["cumulative"]
        parts = [f"cumulative accuracy {cum['accuracy']:.3f}" if isinstance(cum.get("accuracy"), int | float) else "",
                 f"over {cum['count']} labelled prediction(s)" if "count" in cum else "",
                 f"macro F1 {cum['macro_avg']['f1']:.3f}" if isinstance(cum.get("macro_avg"), dict)
                 and isinstance(cum["macro_avg"].get("f1"), int | float) else ""]
        return ", ".join(p for p in parts if p)
    text = json.dumps(response, sort_keys=True)
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass
class _Pending:
    """Feedback waiting to be sent for one model: (prediction id or None, predicted, true) triples."""

    items: list[tuple[str | None, int, int]] = field(default_factory=list)


class FeedbackSender:
    """Batches labelled predictions per model and POSTs them to the model server's feedback API."""

    def __init__(self, url: str, api_key: str | None = None, batch: int = 50, timeout_s: float = 30.0) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.batch = batch
        self._pending: dict[str, _Pending] = defaultdict(_Pending)

    def add(self, model: str, prediction_id: str | None, predicted: int, true: int, report: Report) -> None:
        pending = self._pending[model]
        pending.items.append((prediction_id, predicted, true))
        if len(pending.items) >= self.batch:
            self.flush(report, model)

    def _post(self, model: str, body: dict[str, Any]) -> httpx.Response:
        return self._client.post(f"/v2/models/{model}/feedback", json=body)

    def flush(self, report: Report, only: str | None = None) -> None:
        for model in [only] if only else list(self._pending):
            items = self._pending.pop(model, _Pending()).items
            if not items:
                continue
            try:
                resp = None
                if all(pid for pid, _, _ in items):
                    resp = self._post(model, {"items": [{"id": pid, "true_label": t} for pid, _, t in items]})
                    if resp.status_code == 409:  # already recorded (a re-run): sending pairs would count it twice
                        report.feedback_errors.append(f"{model}: {resp.json().get('error', 'already recorded')}")
                        continue
                    if 400 <= resp.status_code < 500:
                        log.info("feedback by prediction id refused (%s); sending label pairs", resp.status_code)
                        resp = None
                if resp is None:
                    resp = self._post(model, {"predicted_label": [p for _, p, _ in items],
                                              "true_label": [t for _, _, t in items]})
                resp.raise_for_status()
                report.feedback_sent[model] += len(items)
                report.feedback_responses[model] = resp.json()
            except (httpx.HTTPError, ValueError) as exc:
                report.feedback_errors.append(f"{model}: {exc}")
                log.warning("feedback for %s failed: %s", model, exc)

    def close(self) -> None:
        self._client.close()


def consume_results(messenger: Messenger, *, count: int | None = None, idle_timeout_s: float | None = 30.0,
                    feedback: FeedbackSender | None = None, out: TextIO | None = sys.stdout,
                    on_result: Callable[[dict[str, Any], Message], None] | None = None) -> Report:
    """Print results until ``count`` unique ids were seen or nothing arrived for ``idle_timeout_s``."""
    report = Report()
    seen: set[str] = set()
    for message in messenger.messages(idle_timeout_s=idle_timeout_s):
        try:
            doc = message.json()
        except ValueError:
            log.warning("skipping a non-JSON record at %s", message.position)
            messenger.ack(message)
            continue
        rid = str(doc.get("id") or message.key_str)
        if rid in seen:
            report.duplicates += 1
            messenger.ack(message)
            continue
        seen.add(rid)
        report.results += 1
        if out is not None:
            print(format_result(doc), file=out, flush=True)
        if on_result:
            on_result(doc, message)
        model, label, true = doc.get("model_name") or "?", predicted_label(doc), doc.get("true_label")
        if true is not None and label is not None:
            report.labelled[model] += 1
            report.correct[model] += int(int(true) == label)
            if feedback is not None:
                pids = output(doc, "prediction_id")
                feedback.add(model, str(pids[0]) if pids else None, label, int(true), report)
        messenger.ack(message)
        if count is not None and report.results >= count:
            break
    if feedback is not None:
        feedback.flush(report)
    messenger.commit()
    return report
