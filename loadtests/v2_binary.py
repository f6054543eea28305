"""V2 REST with Triton's binary tensor extension, as tritonclient's HTTP client sends it: a JSON
header (its length in `Inference-Header-Content-Length`), then each input's raw bytes, and
`binary_data_output` so the outputs come back raw too. Measures the server with the least
encoding work per request."""

from __future__ import annotations

import _common


class V2BinaryUser(_common.InferUser):
    protocol = "v2-binary"
