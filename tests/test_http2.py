"""The server side of HTTP/2 in :mod:`predictors.protocol.http2`, bytes in and bytes out.

An independent implementation (the ``h2`` library, as a client) writes the requests and reads the answers, so
what the server sends is checked by a parser that is not ours; hand-made frames cover what a well-behaved client
never sends. The front end over real sockets is in ``tests/test_grpc_front.py``.
"""

from __future__ import annotations

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes
from hpack import Decoder, Encoder

from predictors.protocol import http2

PATH = b"/inference.GRPCInferenceService/ModelInfer"
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", PATH),
           (b"content-type", b"application/grpc"), (b"te", b"trailers")]


def server() -> http2.ServerConnection:
    """A new connection, its opening SETTINGS already taken."""
    srv = http2.ServerConnection(max_concurrent_streams=4, max_header_list_size=16 * 1024)
    assert srv.data_to_send()[3] == http2.SETTINGS
    return srv


def connected() -> tuple[http2.ServerConnection, H2Connection]:
    srv = http2.ServerConnection(max_concurrent_streams=4, max_header_list_size=16 * 1024)
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    assert srv.receive(client.data_to_send()) == []
    client.receive_data(srv.data_to_send())
    srv.receive(client.data_to_send())  # the client's SETTINGS acknowledgement
    client.receive_data(srv.data_to_send())
    return srv, client


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big") + payload


def goaway_code(srv: http2.ServerConnection, data: bytes) -> int:
    """Feed ``data``; the connection must end with GOAWAY, whose error code is returned."""
    with pytest.raises(http2.ConnectionError):
        srv.receive(data)
    out = srv.data_to_send()
    assert out[3] == http2.GOAWAY
    return int.from_bytes(out[13:17], "big")


def reset_code(srv: http2.ServerConnection, data: bytes, stream_id: int) -> int:
    srv.receive(data)
    out = srv.data_to_send()
    assert out[3] == http2.RST_STREAM and int.from_bytes(out[5:9], "big") == stream_id, out
    return int.from_bytes(out[9:13], "big")


def answer(srv: http2.ServerConnection, stream_id: int, body: bytes) -> None:
    assert srv.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    assert srv.send_data(stream_id, body)
    assert srv.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)


def test_a_request_and_its_answer_as_an_independent_client_reads_them():
    srv, client = connected()
    for stream_id in (1, 3, 5):  # the same headers again: decoded from the remembered block
        client.send_headers(stream_id, [*REQUEST, (b"grpc-timeout", b"5S")])
        client.send_data(stream_id, b"request body", end_stream=True)
        events = srv.receive(client.data_to_send())
        assert events == [http2.RequestReceived(stream_id, [*REQUEST, (b"grpc-timeout", b"5S")], False),
                          http2.DataReceived(stream_id, b"request body", True)]
        answer(srv, stream_id, b"answer")
        got = client.receive_data(srv.data_to_send())
        assert [type(e) for e in got] == [ResponseReceived, DataReceived, TrailersReceived, StreamEnded]
        assert got[0].headers == [(b":status", b"200"), (b"content-type", b"application/grpc")]
        assert got[1].data == b"answer" and got[2].headers == [(b"grpc-status", b"0")]


def test_remembered_header_blocks_follow_the_clients_table():
    """An indexed-only block decodes by the table of its time: after the table changed, the same bytes name other
    headers, and are decoded again."""
    srv = server()
    srv.receive(http2.PREFACE + frame(http2.SETTINGS, 0, 0, b""))
    encoder, mirror = Encoder(), Decoder()
    headers = [*REQUEST[:4], (b"x-a", b"1")]
    first = encoder.encode(headers)  # literals with indexing: the table grows
    indexed = encoder.encode(headers)  # the same headers, now all indexed
    assert http2._only_indexed(indexed) and not http2._only_indexed(first)
    changed = encoder.encode([*REQUEST[:4], (b"x-b", b"2")])  # a new entry shifts the others
    for stream_id, block in ((1, first), (3, indexed), (5, indexed), (7, changed), (9, indexed)):
        events = srv.receive(frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, stream_id, block))
        assert events == [http2.RequestReceived(stream_id, mirror.decode(block, raw=True), True)]
        srv.reset_stream(stream_id)
    assert events[0].headers[-2:] == [(b"x-a", b"1"), (b"x-b", b"2")]  # no longer the first decoding of it


def test_a_header_block_split_over_continuation_frames():
    srv, _ = connected()
    block = Encoder().encode(REQUEST)
    srv.receive(frame(http2.HEADERS, 0, 1, block[:5]) + frame(http2.CONTINUATION, 0, 1, block[5:9]))
    events = srv.receive(frame(http2.CONTINUATION, http2.END_HEADERS, 1, block[9:]))
    assert events and events[0].headers == REQUEST


@pytest.mark.parametrize("data, code", [
    (b"GET / HTTP/1.1\r\n\r\n", http2.PROTOCOL_ERROR),
    (http2.PREFACE + frame(http2.PING, 0, 0, b"12345678"), http2.PROTOCOL_ERROR),  # not SETTINGS first
    (http2.PREFACE + frame(http2.SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"), http2.FLOW_CONTROL_ERROR),
    (http2.PREFACE + frame(http2.SETTINGS, 0, 0, b"\x00\x05\x00\x00\x10\x00"), http2.PROTOCOL_ERROR),
    (http2.PREFACE + frame(http2.SETTINGS, 0, 0, b"\x00\x02\x00\x00\x00\x02"), http2.PROTOCOL_ERROR),
    (http2.PREFACE + frame(http2.SETTINGS, 0, 0, b"\x00\x01"), http2.FRAME_SIZE_ERROR),
    (http2.PREFACE + frame(http2.SETTINGS, 0, 1, b""), http2.PROTOCOL_ERROR),
    (http2.PREFACE + (http2.MIN_FRAME_SIZE + 1).to_bytes(3, "big") + b"\x04\x00\x00\x00\x00\x00",
     http2.FRAME_SIZE_ERROR),
], ids=["http1", "ping-first", "window-too-large", "frame-size-too-small", "enable-push-2", "settings-length",
        "settings-on-stream", "frame-too-large"])
def test_a_broken_start_ends_the_connection(data, code):
    assert goaway_code(server(), data) == code


ESTABLISHED = [
    (frame(http2.HEADERS, http2.END_HEADERS, 2, b""), http2.PROTOCOL_ERROR),  # even stream id
    (frame(http2.DATA, 0, 9, b"x"), http2.PROTOCOL_ERROR),  # idle stream
    (frame(http2.CONTINUATION, http2.END_HEADERS, 1, b""), http2.PROTOCOL_ERROR),
    (frame(http2.HEADERS, 0, 1, b"\x82") + frame(http2.PING, 0, 0, b"12345678"), http2.PROTOCOL_ERROR),
    (frame(http2.HEADERS, http2.END_HEADERS, 1, b"\xff\xff\xff\xff\x0f"), http2.COMPRESSION_ERROR),
    (frame(http2.PING, 0, 0, b"1234"), http2.FRAME_SIZE_ERROR),
    (frame(http2.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), http2.PROTOCOL_ERROR),
    (frame(http2.WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"), http2.FLOW_CONTROL_ERROR),
    (frame(http2.PUSH_PROMISE, http2.END_HEADERS, 1, b"\x00\x00\x00\x02"), http2.PROTOCOL_ERROR),
    (frame(http2.RST_STREAM, 0, 0, b"\x00\x00\x00\x08"), http2.PROTOCOL_ERROR),
    (frame(http2.HEADERS, http2.PADDED | http2.END_HEADERS, 1, b"\x05\x82"), http2.PROTOCOL_ERROR),
    (frame(http2.HEADERS, http2.END_HEADERS, 1, b"\x00" + b"\x7f" + b"\xff" * 3 + b"\x7f"), http2.COMPRESSION_ERROR),
]


@pytest.mark.parametrize("data, code", ESTABLISHED, ids=[
    "even-stream", "data-on-idle-stream", "continuation-alone", "interrupted-header-block", "bad-hpack",
    "ping-size", "zero-window-update", "window-overflow", "push-promise", "reset-connection", "bad-padding",
    "huge-header-name"])
def test_connection_errors_end_the_connection_with_their_code(data, code):
    srv, _ = connected()
    assert goaway_code(srv, data) == code
    assert srv.receive(frame(http2.PING, 0, 0, b"12345678")) == []  # and nothing is read after it


def test_a_header_list_over_the_limit_ends_the_connection():
    srv, _ = connected()
    block = Encoder().encode([*REQUEST, (b"x-big", b"v" * 20_000)])
    data = frame(http2.HEADERS, 0, 1, block[:16_000]) + frame(http2.CONTINUATION, http2.END_HEADERS, 1, block[16_000:])
    assert goaway_code(srv, data) == http2.COMPRESSION_ERROR


@pytest.mark.parametrize("headers", [
    [(b":method", b"POST"), (b"content-type", b"application/grpc"), (b":path", PATH)],  # pseudo after regular
    [(b":method", b"POST"), (b":path", PATH), (b"Content-Type", b"application/grpc")],  # uppercase
    [(b":method", b"POST"), (b":path", PATH), (b"connection", b"close")],
    [(b":method", b"POST"), (b":path", PATH), (b"te", b"gzip")],
    [(b":method", b"POST"), (b":path", PATH), (b":status", b"200")],
    [(b":method", b"POST"), (b":method", b"POST"), (b":path", PATH)],
    [(b":method", b"POST")],
], ids=["pseudo-after-regular", "uppercase", "connection-header", "te-not-trailers", "response-pseudo",
        "repeated-pseudo", "no-path"])
def test_malformed_requests_reset_only_their_stream(headers):
    srv, client = connected()
    block = Encoder().encode(headers)
    assert reset_code(srv, frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1, block), 1) == \
        http2.PROTOCOL_ERROR
    client.send_headers(3, REQUEST, end_stream=True)
    assert srv.receive(client.data_to_send())[0] == http2.RequestReceived(3, REQUEST, True)


def test_streams_beyond_the_limit_are_refused():
    srv, client = connected()
    for stream_id in (1, 3, 5, 7):
        client.send_headers(stream_id, REQUEST)
    assert len(srv.receive(client.data_to_send())) == 4
    refused = frame(http2.HEADERS, http2.END_HEADERS, 9, Encoder().encode(REQUEST))  # h2 keeps to the limit
    assert reset_code(srv, refused, 9) == http2.REFUSED_STREAM


def test_data_after_the_request_ended_resets_the_stream_and_the_call():
    srv, client = connected()
    client.send_headers(1, REQUEST, end_stream=True)
    srv.receive(client.data_to_send())
    data = frame(http2.DATA, 0, 1, b"more")
    events = srv.receive(data)
    assert events == [http2.StreamReset(1)]
    assert int.from_bytes(srv.data_to_send()[9:13], "big") == http2.STREAM_CLOSED
    assert not srv.send_headers(1, [(b":status", b"200")])


def test_a_client_reset_cancels_the_call_and_frees_its_slot():
    srv, client = connected()
    client.send_headers(1, REQUEST)
    srv.receive(client.data_to_send())
    client.reset_stream(1)
    assert srv.receive(client.data_to_send()) == [http2.StreamReset(1), http2.WindowOpened()]
    assert not srv.is_open(1)


def test_an_answer_is_held_to_the_clients_windows_and_frame_size():
    srv, client = connected()
    client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    srv.receive(client.data_to_send())
    client.receive_data(srv.data_to_send())
    client.send_headers(1, REQUEST, end_stream=True)
    srv.receive(client.data_to_send())
    body = bytes(range(256)) * 40
    assert srv.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    assert srv.send_window(1) == 1000
    assert not srv.send_data(1, body)  # more than the window: nothing is queued
    received = bytearray()
    while len(received) < len(body):
        window = srv.send_window(1)
        assert 0 < window <= 1000
        chunk = body[len(received):len(received) + window]
        assert srv.send_data(1, chunk)
        for event in client.receive_data(srv.data_to_send()):
            if isinstance(event, DataReceived):
                received += event.data
                client.acknowledge_received_data(event.flow_controlled_length, 1)
        assert srv.receive(client.data_to_send()) in ([], [http2.WindowOpened()], [http2.WindowOpened()] * 2)
    assert bytes(received) == body


def test_request_bodies_are_credited_back_to_the_client():
    srv, client = connected()
    client.send_headers(1, REQUEST)
    body = b"x" * 16_000
    for _ in range(40):  # 640 kB: beyond the default 64 KiB windows
        client.send_data(1, body)
        srv.receive(client.data_to_send())
        client.receive_data(srv.data_to_send())
    client.send_data(1, b"", end_stream=True)
    assert srv.receive(client.data_to_send()) == [http2.DataReceived(1, b"", True)]


def test_ping_settings_and_trailers():
    srv, client = connected()
    client.ping(b"abcdefgh")
    client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 256})
    srv.receive(client.data_to_send())
    got = client.receive_data(srv.data_to_send())
    assert any(type(e).__name__ == "PingAckReceived" and e.ping_data == b"abcdefgh" for e in got)
    assert any(type(e).__name__ == "SettingsAcknowledged" for e in got)
    client.send_headers(1, REQUEST)
    client.send_data(1, b"body")
    client.send_headers(1, [(b"x-trailer", b"1")], end_stream=True)
    events = srv.receive(client.data_to_send())
    assert events[-1] == http2.DataReceived(1, b"", True)
    answer(srv, 1, b"ok")  # the first block after the table size change starts with a size update
    assert [type(e) for e in client.receive_data(srv.data_to_send())] == [
        ResponseReceived, DataReceived, TrailersReceived, StreamEnded]


def test_goaway_refuses_new_streams_and_lets_open_ones_finish():
    srv, client = connected()
    client.send_headers(1, REQUEST, end_stream=True)
    srv.receive(client.data_to_send())
    srv.close()
    got = client.receive_data(srv.data_to_send())
    assert isinstance(got[0], ConnectionTerminated) and got[0].last_stream_id == 1
    srv.receive(frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 3, Encoder().encode(REQUEST)))
    assert int.from_bytes(srv.data_to_send()[9:13], "big") == http2.REFUSED_STREAM
    answer(srv, 1, b"late but whole")


def test_a_stream_reset_by_the_server_is_gone():
    srv, client = connected()
    client.send_headers(1, REQUEST)
    srv.receive(client.data_to_send())
    srv.reset_stream(1)
    got = client.receive_data(srv.data_to_send())
    assert isinstance(got[0], StreamReset)
    assert not srv.is_open(1) and srv.send_window(1) == 0
