"""Ordered offset commits, micro-batch merge/split, V2 wire encodings and error classes (no broker needed)."""

from __future__ import annotations

import asyncio

import pytest

from streaming.batching import MicroBatcher
from streaming.offsets import OffsetTracker
from streaming.settings import V2ClientSettings
from streaming.tensors import (
    BatchSplitError,
    InferRequest,
    InferResponse,
    Tensor,
    deserialize_bytes,
    merge,
    serialize_bytes,
    split,
)
from streaming.v2client import (
    V2Client,
    V2Error,
    from_grpc,
    from_rest,
    http_error_kind,
    to_grpc,
    to_rest,
)
from tests.fixtures.ports import free_port


def test_commit_point_is_the_lowest_unfinished_offset() -> None:
    tracker = OffsetTracker()
    part = tracker.assign("t", 0)
    for offset in range(10, 15):
        tracker.add(part, offset)
    assert tracker.to_commit() == {("t", 0): 10}  # nothing done: commit where we started
    tracker.done(part, 12)
    tracker.done(part, 11)
    assert tracker.to_commit() == {("t", 0): 10}  # 10 still in flight: 11 and 12 must wait
    tracker.done(part, 10)
    assert tracker.to_commit() == {("t", 0): 13}
    tracker.mark_committed({("t", 0): 13})
    assert tracker.to_commit() == {}
    tracker.done(part, 14)
    tracker.done(part, 13)
    assert tracker.to_commit() == {("t", 0): 15}
    assert tracker.in_flight() == 0


def test_acks_for_a_revoked_partition_are_ignored() -> None:
    tracker = OffsetTracker()
    old = tracker.assign("t", 0)
    tracker.add(old, 0)
    tracker.revoke("t", 0)
    new = tracker.assign("t", 0)
    tracker.add(new, 0)
    tracker.done(old, 0)  # a late ack from before the rebalance
    assert tracker.to_commit() == {("t", 0): 0}


def rows(n: int, start: float, rid: str) -> InferRequest:
    return InferRequest("iris", [Tensor("input-0", "FP32", [n, 2], [start + i for i in range(2 * n)]),
                                 Tensor("ids", "BYTES", [n], [rid.encode()] * n)], id=rid)


def test_merge_concatenates_rows_and_split_cuts_them_back() -> None:
    a, b = rows(1, 0, "a"), rows(2, 10, "b")
    assert a.batch_key() == b.batch_key() is not None
    merged = merge([a, b])
    assert merged.inputs[0].shape == [3, 2] and merged.inputs[0].data == [0, 1, 10, 11, 12, 13]
    response = InferResponse("iris", [Tensor("label", "INT64", [3], [0, 1, 2]),
                                      Tensor("probabilities", "FP32", [3, 2], [1, 0, 0, 1, 0.5, 0.5])], id=merged.id)
    first, second = split(response, [a, b])
    assert (first.id, first.outputs[0].data, first.outputs[1].shape) == ("a", [0], [1, 2])
    assert (second.id, second.outputs[0].data, second.outputs[1].data) == ("b", [1, 2], [0, 1, 0.5, 0.5])


def test_incompatible_requests_do_not_share_a_batch_and_odd_outputs_do_not_split() -> None:
    three_features = InferRequest("iris", [Tensor("input-0", "FP32", [1, 3], [1, 2, 3])])
    assert rows(1, 0, "a").batch_key() != three_features.batch_key()
    assert InferRequest("iris", [Tensor("input-0", "FP32", [1, 4], [1, 2, 3])]).batch_key() is None  # inconsistent
    with pytest.raises(BatchSplitError):
        split(InferResponse("iris", [Tensor("summary", "FP32", [1], [0.5])]), [rows(1, 0, "a"), rows(1, 0, "b")])


def test_micro_batcher_flushes_on_size_and_on_delay() -> None:
    batches: list[list[int]] = []

    async def scenario() -> None:
        batcher: MicroBatcher[int] = MicroBatcher(3, 0.01, batches.append)
        for i in range(4):
            batcher.add("k", i)
        batcher.add(None, 99)  # not batchable: handed off alone at once
        assert batches == [[0, 1, 2], [99]]
        for _ in range(1000):  # the 10 ms timer fires long before this gives up
            if not batcher.waiting:
                break
            await asyncio.sleep(0.005)

    asyncio.run(scenario())
    assert batches == [[0, 1, 2], [99], [3]]


def test_grpc_and_rest_encodings_round_trip() -> None:
    request = InferRequest("m", [Tensor("x", "FP32", [1, 2], [0.5, 1.5]),
                                 Tensor("img", "BYTES", [2], [b"\x89PNG", "txt"])],
                           id="r", parameters={"flag": True, "n": 3})
    message = to_grpc(request)
    assert message.model_name == "m" and message.id == "r" and message.parameters["n"].int64_param == 3
    assert deserialize_bytes(message.raw_input_contents[1]) == [b"\x89PNG", b"txt"]
    body, headers = to_rest(request)
    header_len = int(headers["inference-header-content-length"])
    assert body[header_len:] == serialize_bytes([b"\x89PNG", b"txt"])
    response = from_rest({"id": "r", "model_name": "m", "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [[2]]}]})
    assert response.output("label").data == [2]  # type: ignore[union-attr]
    from streaming.v2_grpc import pb2
    reply = pb2.ModelInferResponse(model_name="m", id="r")
    reply.outputs.add(name="label", datatype="INT64", shape=[2])
    reply.raw_output_contents.append((7).to_bytes(8, "little") + (9).to_bytes(8, "little"))
    assert from_grpc(reply).outputs[0].data == [7, 9]


def test_numeric_data_of_the_wrong_kind_is_rejected_not_coerced() -> None:
    with pytest.raises(V2Error) as info:
        to_grpc(InferRequest("m", [Tensor("x", "INT64", [1], [1.5])]))
    assert info.value.kind == "rejected" and info.value.status == 400
    with pytest.raises(V2Error):
        to_grpc(InferRequest("m", [Tensor("x", "FP32", [1], ["a"])]))


def test_error_classes_decide_retry_or_dead_letter() -> None:
    assert [http_error_kind(s) for s in (400, 404, 401, 403, 413, 429, 500, 503)] == [
        "rejected", "rejected", "unauthorized", "unauthorized", "too-large", "outage", "server-error", "outage"]


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_connection_refused_is_an_outage(protocol: str) -> None:
    port = free_port()  # nothing listens here
    settings = V2ClientSettings(protocol=protocol, grpc_target=f"127.0.0.1:{port}", rest_url=f"http://127.0.0.1:{port}",
                                timeout_s=5)

    async def call() -> V2Error:
        client = V2Client(settings)
        try:
            await client.transport.infer(InferRequest("iris", [Tensor("input-0", "FP32", [1, 1], [1.0])]))
        except V2Error as exc:
            return exc
        finally:
            await client.close()
        raise AssertionError("a call to a closed port succeeded")

    error = asyncio.run(call())
    assert error.kind == "outage"
