"""``python -m devtools.cloudevents_cost``: the per-message cost of our CloudEvents binding against the SDK's.

It times what the bridge does per message -- decode a binary-mode request event, write a result event's
headers -- with :mod:`streaming.cloudevents` and with the ``cloudevents`` SDK wrapped in the checks the
bridge needs (a required attribute the SDK would invent, the spec version, strict header decoding). It is
the measurement behind keeping our own binding; run it again when either side changes.
"""

from __future__ import annotations

import timeit
from typing import Any

from cloudevents.http import CloudEvent as SdkEvent
from cloudevents.kafka import KafkaMessage, from_binary, to_binary

from streaming.cloudevents import KNOWN, REQUIRED, SPEC_VERSION, CloudEvent, CloudEventError, from_kafka, now
from streaming.cloudevents import to_kafka_headers as own_headers


def _identity(x: Any) -> Any:
    return x


def sdk_from_kafka(headers: list[tuple[str, bytes]], value: bytes) -> CloudEvent | None:
    """The SDK's binary-mode decoder with the checks :func:`streaming.cloudevents.from_kafka` makes."""
    by_name = {k.lower(): v for k, v in headers}
    if "ce_specversion" not in by_name:
        return None
    missing = [a for a in REQUIRED if not by_name.get("ce_" + a)]  # the SDK would make up an id and a time
    if missing:
        raise CloudEventError(f"CloudEvent lacks required attribute(s): {', '.join(missing)}")
    try:
        event = from_binary(KafkaMessage(by_name, None, value), data_unmarshaller=_identity)
    except UnicodeDecodeError as exc:
        raise CloudEventError(str(exc)) from exc
    a = event.get_attributes()
    if a["specversion"] != SPEC_VERSION:
        raise CloudEventError(f"unsupported CloudEvents specversion {a['specversion']!r}")
    return CloudEvent(a["id"], a["source"], a["type"], a["specversion"], a.get("datacontenttype"),
                      a.get("dataschema"), a.get("subject"), a.get("time"),
                      {k: v for k, v in a.items() if k not in KNOWN}, event.get_data())


def main(number: int = 10_000) -> None:
    data = b'{"id":"r-1","features":[5.1,3.5,1.4,0.2],"model":"iris"}'
    request = CloudEvent("r-1", "/kcp/streaming/producer/iris", "org.kcp.inference.request.row", subject="iris",
                         time=now(), datacontenttype="application/json", extensions={"model": "iris"}, data=data)
    headers = [*own_headers(request), ("kcp-model", b"iris")]
    result = {"id": "r-1", "source": "/kcp/streaming/bridge", "type": "org.kcp.inference.result", "subject": "iris",
              "time": request.time, "datacontenttype": "application/json", "correlationid": "r-1"}
    assert sdk_from_kafka(headers, data) == from_kafka(headers, data)

    def own_result() -> list[tuple[str, bytes]]:
        return own_headers(CloudEvent(result["id"], result["source"], result["type"], subject=result["subject"],
                                      time=result["time"], datacontenttype=result["datacontenttype"],
                                      extensions={"correlationid": result["correlationid"]}))

    def sdk_result() -> list[tuple[str, bytes]]:
        return list(to_binary(SdkEvent(result, None), data_marshaller=_identity).headers.items())

    def micros(fn: Any) -> float:
        return timeit.timeit(fn, number=number) / number * 1e6

    own_in, sdk_in = micros(lambda: from_kafka(headers, data)), micros(lambda: sdk_from_kafka(headers, data))
    own_out, sdk_out = micros(own_result), micros(sdk_result)
    print(f"decode: own {own_in:.1f} us, SDK {sdk_in:.1f} us; encode: own {own_out:.1f} us, SDK {sdk_out:.1f} us; "
          f"SDK extra per message, both ways: {sdk_in + sdk_out - own_in - own_out:.1f} us ({number} iterations)")


if __name__ == "__main__":
    main()
