"""The server side of HTTP/2 (RFC 9113) that gRPC's unary calls need, without I/O: bytes in, events out.

The ``h2`` library implements every corner of HTTP/2 through a general state machine, header validation and
HPACK coding in Python on every frame; for a small request that costs more than the model and our whole request
path. This module does the same protocol work for one shape of traffic (a client opens streams, sends headers and
a body, and gets headers, a body and trailers back) with a few branches per frame:

* frames are checked as RFC 9113 asks (sizes, stream ids, flags, padding, the order of header blocks and
  CONTINUATION frames, flow-control windows, SETTINGS values); a connection error queues ``GOAWAY`` and raises
  :class:`ConnectionError`, a stream error queues ``RST_STREAM`` and the connection goes on;
* request headers are decoded with ``hpack``'s decoder (the one ``h2`` uses). A block made only of indexed fields
  does not change the decoder's table, so its decoded list is remembered per block bytes until a block that may
  change the table arrives: a client repeating the same headers (every gRPC client does) is decoded once;
* answers are encoded as HPACK literals that never enter a dynamic table, so the server keeps no encoder state
  (a table size update of zero opens the first block after the client changes its table size);
* received data is credited back to the client's windows as it arrives: the caller bounds what it buffers.

Server push, priorities and request trailers are not used by gRPC: push is refused, priorities are read and
ignored, and a request's trailers only end its stream.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

from hpack import Decoder
from hpack.exceptions import HPACKError

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9

HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = (
    range(1, 7))

DEFAULT_WINDOW: Final = 65_535
MAX_WINDOW: Final = 2**31 - 1
MIN_FRAME_SIZE: Final = 16_384
MAX_FRAME_SIZE_LIMIT: Final = 2**24 - 1
RECEIVE_WINDOW: Final = 1 << 20
"""The window announced for each stream and added to the connection's: a request of up to this size arrives
without waiting for a window update."""
MAX_HEADER_BLOCK: Final = 64 * 1024
"""Compressed header bytes one block may take (HEADERS plus CONTINUATION frames) before the connection ends."""
_DECODED_BLOCKS: Final = 64
"""Distinct indexed-only header blocks remembered per connection."""
_CONNECTION_HEADERS: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                        b"upgrade"})
_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":path", b":authority"})


class ConnectionError(Exception):
    """The client broke HTTP/2: ``GOAWAY`` is queued and the connection must be closed after sending it."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(slots=True)
class RequestReceived:
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    ended: bool
    """The request ended with its headers (no body)."""


@dataclass(slots=True)
class DataReceived:
    stream_id: int
    data: bytes
    ended: bool


@dataclass(slots=True)
class StreamReset:
    stream_id: int


@dataclass(slots=True)
class WindowOpened:
    """Sending may go on: a window grew, or a stream the sender waited on is gone."""


@dataclass(slots=True)
class ClientGoingAway:
    """The client sent ``GOAWAY``."""


Event = RequestReceived | DataReceived | StreamReset | WindowOpened | ClientGoingAway


@dataclass(slots=True)
class _Stream:
    send_window: int
    receive_unacknowledged: int = 0
    remote_ended: bool = False
    local_ended: bool = False


class ServerConnection:
    """One HTTP/2 connection, server side: :meth:`receive` turns bytes into events; answers are queued by the
    ``send_*`` methods and taken with :meth:`data_to_send`."""

    def __init__(self, *, max_concurrent_streams: int, max_header_list_size: int) -> None:
        self.max_concurrent_streams = max_concurrent_streams
        self._decoder = Decoder(max_header_list_size=max_header_list_size)
        self._decoded: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._buffer = bytearray()
        self._out = bytearray()
        self._preface_seen = False
        self._settings_seen = False
        self._streams: dict[int, _Stream] = {}
        self._last_stream_id = 0
        self._header_block: bytearray | None = None
        self._header_stream = 0
        self._header_ends_stream = False
        self._send_window = DEFAULT_WINDOW
        self._peer_initial_window = DEFAULT_WINDOW
        self.max_outbound_frame_size = MIN_FRAME_SIZE
        self._receive_unacknowledged = 0
        self._table_size_update = False
        self._going_away = False
        self.closed = False
        self._out += _frame(SETTINGS, 0, 0, b"".join(
            setting.to_bytes(2, "big") + value.to_bytes(4, "big") for setting, value in (
                (MAX_CONCURRENT_STREAMS, max_concurrent_streams), (MAX_HEADER_LIST_SIZE, max_header_list_size),
                (INITIAL_WINDOW_SIZE, RECEIVE_WINDOW), (ENABLE_PUSH, 0))))
        self._out += _frame(WINDOW_UPDATE, 0, 0, RECEIVE_WINDOW.to_bytes(4, "big"))

    # -- receiving -------------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """The events in ``data``. Raises :class:`ConnectionError` (with ``GOAWAY`` queued) when the client
        broke the protocol; the connection is then of no further use."""
        if self.closed:
            return []
        buffer = self._buffer
        buffer += data
        events: list[Event] = []
        try:
            if not self._preface_seen:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buffer)):
                        raise ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    return events
                if buffer[:len(PREFACE)] != PREFACE:
                    raise ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                del buffer[:len(PREFACE)]
                self._preface_seen = True
            start = 0
            end = len(buffer)
            while end - start >= 9:
                length = int.from_bytes(buffer[start:start + 3], "big")
                if length > MIN_FRAME_SIZE:
                    raise ConnectionError(FRAME_SIZE_ERROR, f"a frame of {length} bytes exceeds {MIN_FRAME_SIZE}")
                if end - start < 9 + length:
                    break
                kind, flags = buffer[start + 3], buffer[start + 4]
                stream_id = int.from_bytes(buffer[start + 5:start + 9], "big") & 0x7FFF_FFFF
                payload = bytes(buffer[start + 9:start + 9 + length])
                start += 9 + length
                self._frame(kind, flags, stream_id, payload, events)
            del buffer[:start]
        except ConnectionError as exc:
            self._go_away(exc.code, str(exc))
            raise
        return events

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if self._header_block is not None and (kind != CONTINUATION or stream_id != self._header_stream):
            raise ConnectionError(PROTOCOL_ERROR, "a header block was interrupted by another frame")
        if not self._settings_seen and kind != SETTINGS:
            raise ConnectionError(PROTOCOL_ERROR, "the connection did not start with SETTINGS")
        if kind == DATA:
            self._data(flags, stream_id, payload, events)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload, events)
        elif kind == CONTINUATION:
            if self._header_block is None:
                raise ConnectionError(PROTOCOL_ERROR, "CONTINUATION without a header block")
            self._header_block += payload
            if len(self._header_block) > MAX_HEADER_BLOCK:
                raise ConnectionError(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                self._header_block_done(events)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload, events)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload, events)
        elif kind == PING:
            if stream_id:
                raise ConnectionError(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ConnectionError(FRAME_SIZE_ERROR, "PING payload is not 8 bytes")
            if not flags & ACK:
                self._out += _frame(PING, ACK, 0, payload)
        elif kind == RST_STREAM:
            if not stream_id:
                raise ConnectionError(PROTOCOL_ERROR, "RST_STREAM on the connection")
            if len(payload) != 4:
                raise ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM payload is not 4 bytes")
            if stream_id > self._last_stream_id:
                raise ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            if self._streams.pop(stream_id, None) is not None:
                events.append(StreamReset(stream_id))
                events.append(WindowOpened())
        elif kind == PRIORITY:
            if not stream_id:
                raise ConnectionError(PROTOCOL_ERROR, "PRIORITY on the connection")
            if len(payload) != 5:
                self._reset(stream_id, FRAME_SIZE_ERROR)
        elif kind == GOAWAY:
            if stream_id:
                raise ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
            events.append(ClientGoingAway())
        elif kind == PUSH_PROMISE:
            raise ConnectionError(PROTOCOL_ERROR, "a client cannot push")
        # Frames of unknown types are ignored (RFC 9113, 5.5).

    def _data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id:
            raise ConnectionError(PROTOCOL_ERROR, "DATA on the connection")
        flow_length = len(payload)
        if flags & PADDED:
            payload = _unpadded(payload)
        self._credit_connection(flow_length)
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_ended:
            if stream_id > self._last_stream_id:
                raise ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            if stream is not None:
                self._streams.pop(stream_id)
                events.append(StreamReset(stream_id))
            self._reset(stream_id, STREAM_CLOSED)
            return
        ended = bool(flags & END_STREAM)
        stream.receive_unacknowledged += flow_length
        if ended:
            stream.remote_ended = True
            self._forget_if_done(stream_id, stream)
        elif stream.receive_unacknowledged >= RECEIVE_WINDOW // 2:
            self._out += _frame(WINDOW_UPDATE, 0, stream_id, stream.receive_unacknowledged.to_bytes(4, "big"))
            stream.receive_unacknowledged = 0
        events.append(DataReceived(stream_id, payload, ended))

    def _credit_connection(self, length: int) -> None:
        self._receive_unacknowledged += length
        if self._receive_unacknowledged >= RECEIVE_WINDOW // 2:
            self._out += _frame(WINDOW_UPDATE, 0, 0, self._receive_unacknowledged.to_bytes(4, "big"))
            self._receive_unacknowledged = 0

    def _headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id or not stream_id % 2:
            raise ConnectionError(PROTOCOL_ERROR, f"HEADERS on stream {stream_id}, which a client cannot open")
        if flags & PADDED:
            payload = _unpadded(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            payload = payload[5:]
        self._header_stream = stream_id
        self._header_ends_stream = bool(flags & END_STREAM)
        self._header_block = bytearray(payload)
        if flags & END_HEADERS:
            self._header_block_done(events)

    def _header_block_done(self, events: list[Event]) -> None:
        assert self._header_block is not None
        block, stream_id, ended = bytes(self._header_block), self._header_stream, self._header_ends_stream
        self._header_block = None
        headers = self._decode(block)  # always: the decoder's table must see every block
        stream = self._streams.get(stream_id)
        if stream_id > self._last_stream_id:
            self._last_stream_id = stream_id
            if self._going_away or len(self._streams) >= self.max_concurrent_streams:
                self._reset(stream_id, REFUSED_STREAM)
                return
            if not _valid_request_headers(headers):
                self._reset(stream_id, PROTOCOL_ERROR)
                return
            stream = _Stream(self._peer_initial_window, remote_ended=ended)
            self._streams[stream_id] = stream
            events.append(RequestReceived(stream_id, headers, ended))
        elif stream is not None and not stream.remote_ended and ended:
            stream.remote_ended = True  # the request's trailers: they only end the stream
            self._forget_if_done(stream_id, stream)
            events.append(DataReceived(stream_id, b"", True))
        else:
            if stream is not None:
                self._streams.pop(stream_id)
                events.append(StreamReset(stream_id))
            self._reset(stream_id, STREAM_CLOSED if stream is None else PROTOCOL_ERROR)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        headers = self._decoded.get(block)
        if headers is not None:
            return headers
        try:
            headers = self._decoder.decode(block, raw=True)
        except HPACKError as exc:
            raise ConnectionError(COMPRESSION_ERROR, f"header block: {exc}") from exc
        if _only_indexed(block):
            if len(self._decoded) >= _DECODED_BLOCKS:
                self._decoded.clear()
            self._decoded[block] = headers
        else:  # this block may have changed the table every remembered block was decoded with
            self._decoded.clear()
        return headers

    def _settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id:
            raise ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionError(FRAME_SIZE_ERROR, "SETTINGS acknowledgement with a payload")
            return
        if len(payload) % 6:
            raise ConnectionError(FRAME_SIZE_ERROR, "SETTINGS payload is not a list of settings")
        self._settings_seen = True
        for at in range(0, len(payload), 6):
            setting, value = int.from_bytes(payload[at:at + 2], "big"), int.from_bytes(payload[at + 2:at + 6], "big")
            if setting == HEADER_TABLE_SIZE:
                self._table_size_update = True
            elif setting == ENABLE_PUSH and value > 1:
                raise ConnectionError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH is not 0 or 1")
            elif setting == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise ConnectionError(FLOW_CONTROL_ERROR, "a stream's window grew above 2^31-1")
                if delta > 0:
                    events.append(WindowOpened())
            elif setting == MAX_FRAME_SIZE:
                if not MIN_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
                    raise ConnectionError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.max_outbound_frame_size = value
        self._out += _frame(SETTINGS, ACK, 0, b"")

    def _window_update(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        increment = int.from_bytes(payload, "big") & 0x7FFF_FFFF
        if not stream_id:
            if not increment:
                raise ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ConnectionError(FLOW_CONTROL_ERROR, "the connection's window grew above 2^31-1")
            events.append(WindowOpened())
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream_id:
                raise ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return  # a stream that just closed
        if not increment:
            self._streams.pop(stream_id)
            events.append(StreamReset(stream_id))
            self._reset(stream_id, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._streams.pop(stream_id)
            events.append(StreamReset(stream_id))
            self._reset(stream_id, FLOW_CONTROL_ERROR)
            return
        events.append(WindowOpened())

    # -- sending ---------------------------------------------------------------------------------

    def is_open(self, stream_id: int) -> bool:
        """Whether an answer can still be sent on the stream."""
        stream = self._streams.get(stream_id)
        return stream is not None and not stream.local_ended and not self.closed

    def send_window(self, stream_id: int) -> int:
        """How many bytes of DATA the stream may send now (0 for a stream that is gone)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return max(0, min(stream.send_window, self._send_window))

    def send_headers(self, stream_id: int, fields: list[tuple[bytes, bytes]], *, end_stream: bool = False) -> bool:
        """Queue a header block (``:status`` first). False when the stream is gone (reset by the client)."""
        if not self.is_open(stream_id):
            return False
        block = _encoded(tuple(fields))
        if self._table_size_update:
            block = b"\x20" + block
            self._table_size_update = False
        size = self.max_outbound_frame_size
        first, rest = bytes(block[:size]), block[size:]
        flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
        self._out += _frame(HEADERS, flags, stream_id, first)
        while rest:
            piece, rest = bytes(rest[:size]), rest[size:]
            self._out += _frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, piece)
        if end_stream:
            self._end_local(stream_id)
        return True

    def send_data(self, stream_id: int, data: bytes) -> bool:
        """Queue DATA within the windows (the caller checks :meth:`send_window` first)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended or len(data) > self.send_window(stream_id):
            return False
        size = self.max_outbound_frame_size
        for at in range(0, len(data), size):
            self._out += _frame(DATA, 0, stream_id, data[at:at + size])
        stream.send_window -= len(data)
        self._send_window -= len(data)
        return True

    def reset_stream(self, stream_id: int, code: int = CANCEL) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._reset(stream_id, code)

    def close(self, code: int = NO_ERROR) -> None:
        """Queue ``GOAWAY``: calls already open may still be answered, new ones are refused."""
        if not self.closed and not self._going_away:
            self._going_away = True
            self._out += self._goaway_frame(code)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _end_local(self, stream_id: int) -> None:
        stream = self._streams[stream_id]
        stream.local_ended = True
        self._forget_if_done(stream_id, stream)

    def _forget_if_done(self, stream_id: int, stream: _Stream) -> None:
        if stream.local_ended and stream.remote_ended:
            del self._streams[stream_id]

    def _reset(self, stream_id: int, code: int) -> None:
        self._out += _frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big"))

    def _go_away(self, code: int, reason: str) -> None:
        if not self.closed:
            self._out += self._goaway_frame(code, reason.encode()[:256])
            self.closed = True

    def _goaway_frame(self, code: int, debug: bytes = b"") -> bytes:
        return _frame(GOAWAY, 0, 0, self._last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big") + debug)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes | bytearray) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big")
            + bytes(payload))


def _unpadded(payload: bytes) -> bytes:
    if not payload or payload[0] >= len(payload):
        raise ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - payload[0]]


def _only_indexed(block: bytes) -> bool:
    """Whether a header block consists of indexed fields only (RFC 7541, 6.1), which leave the table as it is."""
    at, end = 0, len(block)
    while at < end:
        byte = block[at]
        if not byte & 0x80:
            return False
        at += 1
        if byte & 0x7F == 0x7F:  # the index continues in 7-bit groups
            while at < end and block[at] & 0x80:
                at += 1
            at += 1
    return True


def _valid_request_headers(headers: list[tuple[bytes, bytes]]) -> bool:
    """RFC 9113, 8.2-8.3: pseudo-headers first, each known and once, lowercase names, no connection headers."""
    seen: set[bytes] = set()
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular or name not in _REQUEST_PSEUDO or name in seen:
                return False
            seen.add(name)
        else:
            regular = True
            if name.lower() != name or name in _CONNECTION_HEADERS or (name == b"te" and value != b"trailers"):
                return False
    return b":method" in seen and b":path" in seen


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541, 5.1) with ``first``'s high bits as the representation's pattern."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(0x80 | value & 0x7F)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.lru_cache(maxsize=64)
def _encoded(fields: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """A header block of literals; ``:status: 200`` from the static table."""
    return b"".join(_STATUS_200 if field == (b":status", b"200") else _literal(*field) for field in fields)


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal field without indexing, new name, no Huffman coding (RFC 7541, 6.2.2)."""
    return b"\x00" + _integer(len(name), 7, 0) + name + _integer(len(value), 7, 0) + value


_STATUS_200 = b"\x88"  # ":status: 200" is entry 8 of the static table


__all__ = ["PREFACE", "ClientGoingAway", "ConnectionError", "DataReceived", "Event", "RequestReceived",
           "ServerConnection", "StreamReset", "WindowOpened"]
