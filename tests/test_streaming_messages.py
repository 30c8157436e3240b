"""Decoding request messages: every accepted form, every bad-message kind, and request ids."""

from __future__ import annotations

import base64
import json

import pytest

from devtools.images import png_bytes
from streaming.messages import BadMessage, DecodeOptions, decode, normalise_name
from streaming.messenger import CORRELATION_HEADER, Message

PNG = png_bytes(__import__("numpy").zeros((28, 28), dtype="uint8"))


def msg(value: bytes | str | dict, headers: list[tuple[str, bytes]] | None = None, key: bytes | None = None,
        offset: int = 7) -> Message:
    raw = value if isinstance(value, bytes) else (value if isinstance(value, str) else json.dumps(value)).encode()
    return Message(topic="req", value=raw, key=key, headers=headers or [], partition=1, offset=offset,
                   position=f"req/1/{offset}")


def test_v2_request_with_model_in_a_header_keeps_inputs_outputs_and_parameters() -> None:
    body = {"id": "r-1", "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [2, 2],
                                     "data": [[1, 2], [3, 4]]}],
            "outputs": [{"name": "label"}], "parameters": {"top_k": 2}}
    d = decode(msg(body, [("kcp-model", b"iris"), ("kcp-model-version", b"3")]))
    assert (d.form, d.request_id, d.request.model_name, d.request.model_version) == ("v2", "r-1", "iris", "3")
    t = d.request.inputs[0]
    assert (t.name, t.datatype, t.shape, t.data) == ("input-0", "FP32", [2, 2], [1, 2, 3, 4])
    assert d.request.outputs == ["label"] and d.request.parameters == {"top_k": 2}


def test_v2_request_with_model_in_a_field() -> None:
    d = decode(msg({"model_name": "mnist", "inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 1],
                                                        "data": [3]}]}))
    assert d.request.model_name == "mnist"
    assert d.request_id == "req/1/7"  # no id anywhere: the record position, stable across redelivery


def test_iris_row_named_as_in_the_csv_header_in_model_feature_order() -> None:
    row = {"id": "iris-1", "petal_width": 0.2, "sepal_length": 5.1, "petal_length": 1.4, "sepal_width": 3.5,
           "label": 0, "label_name": "setosa"}
    d = decode(msg(row))
    assert d.form == "row" and d.request.model_name == "iris"
    assert d.request.inputs[0].shape == [1, 4] and d.request.inputs[0].data == [5.1, 3.5, 1.4, 0.2]
    assert d.request.inputs[1].name == "ids" and d.request.inputs[1].data == [b"iris-1"]
    assert d.true_label == 0 and d.extra == {"true_label_name": "setosa"}


def test_row_column_names_are_normalised() -> None:
    assert normalise_name("Sepal Length (cm)") == "sepal_length"
    d = decode(msg({"sepal length (cm)": 1, "sepal width (cm)": 2, "petal length (cm)": 3, "petal width (cm)": 4}))
    assert d.request.inputs[0].data == [1.0, 2.0, 3.0, 4.0]


def test_row_as_features_list_or_bare_list_and_without_ids_input() -> None:
    options = DecodeOptions(ids_input=None, default_row_model="tabular")
    assert decode(msg({"features": [1, 2, 3, 4]}), options).request.inputs[0].data == [1, 2, 3, 4]
    d = decode(msg([[1, 2, 3, 4], [5, 6, 7, 8]]), options)
    assert d.request.model_name == "tabular" and d.request.inputs[0].shape == [2, 4] and len(d.request.inputs) == 1


def test_base64_image_with_image_id_and_true_label() -> None:
    body = {"image_id": "fm-12", "image_b64": base64.b64encode(PNG).decode(), "true_label": 3}
    d = decode(msg(body))
    assert (d.form, d.request_id, d.request.model_name, d.true_label) == ("image", "fm-12", "fashion-mnist", 3)
    image, ids = d.request.inputs
    assert image.datatype == "BYTES" and image.data == [PNG] and ids.data == [b"fm-12"]


def test_raw_png_value_is_an_image_request() -> None:
    d = decode(msg(PNG, [("kcp-model", b"mnist")], key=b"k-9"))
    assert d.form == "image" and d.request_id == "k-9" and d.request.model_name == "mnist"


def test_request_id_precedence_and_correlation_header() -> None:
    ce = [("ce_specversion", b"1.0"), ("ce_id", b"ce-1"), ("ce_source", b"/t"), ("ce_type", b"x"),
          ("content-type", b"application/json")]
    row = {"features": [1, 2, 3, 4]}
    assert decode(msg({**row, "id": "body"}, ce, key=b"key")).request_id == "body"
    assert decode(msg(row, ce, key=b"key")).request_id == "ce-1"
    assert decode(msg(row, key=b"key")).request_id == "key"
    d = decode(msg(row, [(CORRELATION_HEADER, b"corr")], key=b"key"))
    assert d.correlation_id == "corr" and d.request_id == "key"


@pytest.mark.parametrize(("value", "headers", "kind"), [
    (b"\xff\xfe\x00\x01", [], "undecodable"),
    (b"{not json", [], "invalid-json"),
    (b'{"hello": "world"}', [], "invalid-request"),
    (b'"just a string"', [], "invalid-request"),
    (b'{"inputs": "nope"}', [("kcp-model", b"iris")], "invalid-request"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1]}]}', [("kcp-model", b"iris")], "invalid-request"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}]}', [], "invalid-request"),
    (b'{"features": [1, "two", 3, 4]}', [], "invalid-request"),
    (b'{"image_b64": "***not base64***"}', [], "invalid-request"),
    (b"{}", [("ce_specversion", b"1.0"), ("ce_id", b"x")], "invalid-cloudevent"),
])
def test_bad_messages_raise_with_a_kind_and_reason(value: bytes, headers: list, kind: str) -> None:
    with pytest.raises(BadMessage) as info:
        decode(msg(value, headers))
    assert info.value.kind == kind and info.value.reason


def test_structured_cloudevent_carries_the_request_in_data() -> None:
    event = {"specversion": "1.0", "id": "evt-5", "source": "/s", "type": "t", "datacontenttype": "application/json",
             "data": {"features": [1, 2, 3, 4], "true_label": 1}}
    d = decode(msg(event, [("content-type", b"application/cloudevents+json")]))
    assert d.request_id == "evt-5" and d.true_label == 1 and d.cloudevent is not None


def test_a_row_of_named_columns_becomes_one_tensor_per_column() -> None:
    d = decode(msg({"id": "c-1", "model": "churn", "features": [{"age": 52, "city": "paris"},
                                                                 {"age": 23.5, "city": "rome"}]}))
    assert d.request.model_name == "churn"
    age, city = d.request.inputs[:2]
    assert (age.name, age.datatype, age.shape, age.data) == ("age", "FP64", [2], [52.0, 23.5])
    assert (city.name, city.datatype, city.shape, city.data) == ("city", "BYTES", [2], [b"paris", b"rome"])


@pytest.mark.parametrize("features", [[{"city": "a"}, {"city": 3}], {"age": True}, [{"age": 1}, {"city": "x"}], {}])
def test_columns_that_mix_types_or_names_are_refused(features) -> None:
    with pytest.raises(BadMessage) as err:
        decode(msg({"model": "churn", "features": features}))
    assert err.value.kind == "invalid-request"
