"""Building the grpc.aio server that carries the servicer."""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2_grpc

from ember.server.dataplane import DataPlane
from ember.server.rpc.servicer import InferenceServicer


def build_server(
    dataplane: DataPlane,
    address: str,
    *,
    max_send_bytes: int,
    max_receive_bytes: int,
    share_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """The server bound to `address` ("host:port", port 0 = any) and the port it got."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_send_bytes),
            ("grpc.max_receive_message_length", max_receive_bytes),
            # Only `--workers` processes may share the port: otherwise a second server on the
            # same port must fail, not quietly take half the traffic.
            ("grpc.so_reuseport", 1 if share_port else 0),
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(dataplane), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    return server, port
