"""Open Inference Protocol (V2) gRPC stubs, generated from the spec's ``open_inference_grpc.proto``.

Committed generated code (see ``generate.py`` for why and how to regenerate). The messages live
in a private descriptor pool so this package can be imported next to KServe's own copy.
"""

from . import open_inference_grpc_pb2 as pb2
from . import open_inference_grpc_pb2_grpc as pb2_grpc

__all__ = ["pb2", "pb2_grpc"]
