"""V2 REST with JSON tensors (`POST /v2/models/{m}/infer`, `{"inputs": [...]}`): what curl and
most HTTP clients send. Measures JSON decoding and encoding on top of the model."""

from __future__ import annotations

import _common


class V2JsonUser(_common.InferUser):
    protocol = "v2-json"
