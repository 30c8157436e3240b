"""API-key rotation on a real server: the key file is a Kubernetes-style mounted Secret, swapped in place.

The kubelet writes a new Secret version into a fresh ``..<timestamp>`` directory and atomically
re-points the ``..data`` symlink at it; ``api-key`` itself is a symlink through ``..data``. The
test does exactly that and checks REST and gRPC take the new key without a restart, while the
old key still works during the overlap and stops working after it.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import httpx
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from tests.fixtures.ports import wait_for
from tests.fixtures.server import start_model_server

OVERLAP_S = 10


def write_secret(mount: Path, version: str, key: str) -> None:
    """Publish ``key`` as the Secret's ``api-key`` the way the kubelet updates a mounted Secret."""
    data = mount / f"..{version}"
    data.mkdir()
    (data / "api-key").write_text(key + "\n")
    (mount / "..data_tmp").symlink_to(data.name)
    os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap
    if not (mount / "api-key").is_symlink():
        (mount / "api-key").symlink_to("..data/api-key")


def rest_status(url: str, key: str) -> int:
    return httpx.get(f"{url}/v2/models/iris", headers={"X-API-Key": key}, timeout=30).status_code


def grpc_code(target: str, key: str) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
                pb.ServerMetadataRequest(), metadata=[("authorization", f"Bearer {key}")], timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_a_rotated_key_file_is_picked_up_with_an_overlap(iris_dir: Path, tmp_path: Path) -> None:
    mount = tmp_path / "secret"
    mount.mkdir()
    write_secret(mount, "2026_12_02_1", "old-key")
    env = {"KCP_API_KEY_FILE": str(mount / "api-key"), "KCP_API_KEY_OVERLAP_S": str(OVERLAP_S)}
    with start_model_server(iris_dir, tmp_path, env=env) as server:
        url, target = server.http_url, server.grpc_target
        assert rest_status(url, "old-key") == 200 and rest_status(url, "new-key") == 401
        assert grpc_code(target, "old-key") == grpc.StatusCode.OK

        write_secret(mount, "2026_12_02_2", "new-key")
        wait_for(lambda: rest_status(url, "new-key") == 200, timeout=60, what="the new key to be accepted")
        assert grpc_code(target, "new-key") == grpc.StatusCode.OK
        assert rest_status(url, "old-key") == 200  # within the overlap: clients still on the old key work
        assert rest_status(url, "wrong") == 401

        wait_for(lambda: rest_status(url, "old-key") == 401, timeout=60, what="the overlap to end")
        assert grpc_code(target, "old-key") == grpc.StatusCode.UNAUTHENTICATED
        assert rest_status(url, "new-key") == 200

        # an empty Secret (a botched update) does not lock everybody out
        write_secret(mount, "2026_12_02_3", "")
        wait_for(lambda: rest_status(url, "new-key") == 200 and "is empty; keeping the current key" in server.log(),
                 timeout=60, what="the empty key file to be noticed")
        assert rest_status(url, "new-key") == 200 and rest_status(url, "") == 401
