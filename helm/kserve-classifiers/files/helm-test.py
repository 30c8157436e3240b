"""`helm test`: one V2 inference and the feedback path of one InferenceService, with the release's API key.

Env: KCP_TEST_URL (the predictor's base URL), KCP_TEST_MODEL, KCP_API_KEY (absent: no key), KCP_TEST_REQUEST
(a V2 inference request as JSON; absent: zeros shaped like the first input in the model's metadata),
KCP_TEST_POST_FEEDBACK ("true": also post feedback for the test's own prediction). By default the feedback
check asks the store whether it accepts writes (/v2/feedback/store) and reads the model's report, rather than
posting labels: a smoke test must not add made-up ground truth to the accuracy the model is judged by. Exit
status 0 only if every call answered 200 with the expected body.
"""

import json
import math
import os
import sys
import urllib.error
import urllib.request
import uuid

BASE = os.environ["KCP_TEST_URL"].rstrip("/")
MODEL = os.environ["KCP_TEST_MODEL"]
KEY = os.environ.get("KCP_API_KEY", "")


def call(path, body=None):
    headers = {"Content-Type": "application/json", **({"X-API-Key": KEY} if KEY else {})}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        sys.exit(f"{MODEL}: {request.method} {path} answered {err.code}: {err.read()[:500]!r}")
    except OSError as err:
        sys.exit(f"{MODEL}: {request.method} {path} failed: {err}")


def zeros_request(metadata):
    """Zeros for the model's first input, its data (the others, like "ids", are optional)."""
    tensor = metadata["inputs"][0]
    if tensor["datatype"] == "BYTES":
        sys.exit(f"{MODEL}: input {tensor['name']} is BYTES; give this model a testRequest in the chart's values")
    shape = [1 if d < 0 else d for d in tensor["shape"]]
    return {"inputs": [{"name": tensor["name"], "shape": shape, "datatype": tensor["datatype"],
                        "data": [0] * math.prod(shape)}]}


request = json.loads(os.environ["KCP_TEST_REQUEST"]) if os.environ.get("KCP_TEST_REQUEST") else None
request = request or zeros_request(call(f"/v2/models/{MODEL}"))
request["id"] = f"helm-test-{uuid.uuid4().hex}"
result = call(f"/v2/models/{MODEL}/infer", request)
labels = [o["data"] for o in result.get("outputs", []) if o["name"] == "label"]
if result.get("id") != request["id"] or not labels:
    sys.exit(f"{MODEL}: the inference answered without its id or a label output: {json.dumps(result)[:500]}")
note = "the feedback store accepts writes"
store = call("/v2/feedback/store")
if store.get("available") is not True:
    sys.exit(f"{MODEL}: the feedback store does not accept writes: {json.dumps(store)[:500]}")
if os.environ.get("KCP_TEST_POST_FEEDBACK") == "true":
    pids = [o["data"][0] for o in result["outputs"] if o["name"] == "prediction_id"]
    if not pids:
        sys.exit(f"{MODEL}: the inference answered without a prediction_id to give feedback on")
    posted = call(f"/v2/models/{MODEL}/feedback", {"items": [{"id": pids[0], "true_label": labels[0][0]}]})
    note = f"feedback accepted: {json.dumps(posted)[:200]}"
report = call(f"/v2/models/{MODEL}/feedback")
if report.get("model_name") != MODEL or "cumulative" not in report:
    sys.exit(f"{MODEL}: the feedback report is not this model's: {json.dumps(report)[:500]}")
print(f"{MODEL}: inference {request['id']} -> label {labels[0]}; {note}; "
      f"feedback report: {json.dumps(report['cumulative'])}")
