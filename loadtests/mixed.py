"""Several models on one server at once, each request going to a model drawn by weight
(`--mix mlp=3,identity=1`), all over `--protocol` (default v2-binary). Measures how models
sharing a process (its event loop, CPUs or GPU) slow each other; each model has its own row."""

from __future__ import annotations

import random

import _common


class MixedUser(_common.InferUser):
    def on_start(self) -> None:
        url = _common.base_url(self.environment, self.host)
        protocol = str(_common.option(self.environment, "protocol"))
        mix = _common.parse_mix(str(_common.option(self.environment, "mix")))
        self.requests = [_common.http_infer(self.environment, url, m, protocol) for m, _ in mix]
        self.weights = [w for _, w in mix]
        self.rng = random.Random()

    def next_request(self) -> _common.HttpInfer:
        (request,) = self.rng.choices(self.requests, self.weights)
        return request
