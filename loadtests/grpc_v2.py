"""V2 gRPC (`inference.GRPCInferenceService/ModelInfer`) through tritonclient's own gRPC client,
one channel per user. Locust knows only HTTP, so each call is reported through its request
event (request type `grpc`). The server is found at `--grpc-host` (default: `--host`'s host,
port 8081).

The file is not called grpc.py: locust puts this folder on `sys.path`, where that name would
hide the grpc package.
"""

from __future__ import annotations

import time
from typing import Any

import _common
import gevent
import grpc.experimental.gevent
import tritonclient.grpc as triton
from locust import User, constant, events, task
from tritonclient.utils import InferenceServerException

# grpcio's sync calls block in C unless told to cooperate with gevent (locust runs every user
# as a greenlet); this has to happen before the first channel exists.
grpc.experimental.gevent.init_gevent()

# Channels still open when the run ends. A user stopped in the middle of a call leaves that
# call to grpc; if the interpreter then exits while grpc's greenlets still hold it, the exit
# hangs in grpc's C core (seen about one run in three). Closing every channel and yielding to
# the hub once more before the exit avoids it.
_open: set[triton.InferenceServerClient] = set()


def _close_all(**_: Any) -> None:
    while _open:
        _open.pop().close()
    gevent.sleep(0.5)


_common.listen(events.quit, _close_all)


class GrpcUser(User):
    host = _common.DEFAULT_HOST
    wait_time = constant(0)

    def on_start(self) -> None:
        env = self.environment
        self.model = str(_common.option(env, "model"))
        self.timeout = float(_common.option(env, "request_timeout"))
        self.name = f"{self.model} ModelInfer"
        self.client = triton.InferenceServerClient(_common.grpc_target(env, self.host))
        _open.add(self.client)
        tensors = _common.request_tensors(env, self.model, _common.base_url(env, self.host))
        self.inputs = []
        for tensor in tensors:
            item = triton.InferInput(tensor.name, tensor.shape, tensor.datatype)
            item.set_data_from_numpy(tensor.data)
            self.inputs.append(item)

    def on_stop(self) -> None:
        if self.client in _open:
            _open.discard(self.client)
            self.client.close()

    @task
    def infer(self) -> None:
        started = time.perf_counter()
        length = 0
        error: Exception | None = None
        try:
            result = self.client.infer(self.model, self.inputs, client_timeout=self.timeout)
            response = result.get_response()
            length = sum(len(raw) for raw in response.raw_output_contents)
            if not response.outputs:
                error = RuntimeError("the answer has no outputs")
        except InferenceServerException as exc:
            error = exc
        ms = (time.perf_counter() - started) * 1000.0
        _common.fire_request(self.environment, "grpc", self.name, ms, length, error)
