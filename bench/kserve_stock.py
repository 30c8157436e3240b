"""Stock KServe 0.21 as a peer: ``kserve.ModelServer`` and a plain scikit-learn ``kserve.Model``, no extras.

What a new user would write from KServe's custom-predictor docs: load ``model.joblib``, answer V2
requests with ``predict``. No prediction log, no auth, no batching, KServe's default flags
(its latency log line per request included), so it is the floor a KServe-based server adds to.
Run as ``python -m bench.kserve_stock MODEL_FILE MODEL_NAME --http_port P --grpc_port Q``.
"""

from __future__ import annotations

import sys
import uuid
from contextlib import AbstractContextManager
from pathlib import Path

from bench.common import PYTHON, Service, free_port, service


def serve(model_file: str, model_name: str = "iris") -> None:
    import joblib
    import kserve
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class SKLearnModel(kserve.Model):
        def load(self) -> bool:
            self.estimator = joblib.load(model_file)
            self.ready = True
            return self.ready

        def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
            labels = self.estimator.predict(payload.inputs[0].as_numpy())
            output = InferOutput(name="predict", shape=list(labels.shape), datatype="INT64")
            output.set_data_from_numpy(labels.astype("int64"))
            return InferResponse(model_name=self.name, infer_outputs=[output],
                                 response_id=payload.id or str(uuid.uuid4()))

    model = SKLearnModel(model_name)
    model.load()
    kserve.ModelServer().start([model])


def kserve_stock(name: str, model_file: Path, model_name: str = "iris") -> AbstractContextManager[Service]:
    """Serve ``model_file`` as ``model_name`` with stock KServe; a context manager of :class:`Service`."""
    http_port, grpc_port = free_port(), free_port()
    return service(name, [PYTHON, "-m", "bench.kserve_stock", str(model_file), model_name, "--http_port",
                          str(http_port), "--grpc_port", str(grpc_port)],
                   ready_url=f"http://127.0.0.1:{http_port}/v2/models/{model_name}/ready",
                   http_port=http_port, grpc_port=grpc_port)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv.pop(2))  # KServe parses the remaining flags
