"""KServe V1 (`POST /v1/models/{m}:predict`, `{"instances": [...]}` -> `{"predictions": ...}`):
the protocol of KServe's own Python model servers."""

from __future__ import annotations

import _common


class V1JsonUser(_common.InferUser):
    protocol = "v1"
