"""The reference design's consumer, as the baseline for the bridge: one message at a time.

Consume one message, call the model's REST API synchronously, print the result, take the next
— the loop the original Iris streaming example ran. Run as its own process
(``python -m bench.reference_loop BOOTSTRAP TOPIC GROUP REST_URL COUNT``); it reads ``COUNT``
requests (in the ``features`` form the bridge benchmark produces) from the beginning of the
topic under a fresh consumer group and prints a JSON summary last.
"""

from __future__ import annotations

import json
import sys
import time

import httpx
from kafka import KafkaConsumer


def main() -> None:
    bootstrap, topic, group, rest_url, count = sys.argv[1:6]
    n = int(count)
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                             enable_auto_commit=True)
    client = httpx.Client(base_url=rest_url, timeout=30.0)
    done = 0
    start = None
    for record in consumer:
        if start is None:
            start = time.perf_counter()
        request = json.loads(record.value)
        features = request["features"]
        body = {"inputs": [{"name": "input-0", "shape": [1, len(features)], "datatype": "FP32", "data": features}]}
        answer = client.post("/v2/models/iris/infer", json=body)
        answer.raise_for_status()
        print(request.get("id"), answer.json()["outputs"][0]["data"], flush=False)
        done += 1
        if done >= n:
            break
    seconds = time.perf_counter() - (start or time.perf_counter())
    consumer.close()
    client.close()
    print(json.dumps({"count": done, "seconds": seconds, "results_per_s": done / seconds if seconds else 0.0}))


if __name__ == "__main__":
    main()
