"""Which model a request is for: from the HTTP path (V1 and V2), or from field 1 of a gRPC
request message (`model_name` / `name` in every per-model message of the V2 service)."""

from __future__ import annotations

from urllib.parse import unquote


def model_of_path(path: str) -> str | None:
    """The model a V1 or V2 path names; None for server-level paths."""
    if path.startswith("/v2/models/"):
        name = path[11:].split("/", 1)[0]
    elif path.startswith("/v1/models/"):
        name = path[11:].split("/", 1)[0].split(":", 1)[0]
    else:
        return None
    return unquote(name) or None


def is_model_ready_path(method: str, path: str) -> bool:
    """Readiness of one model: answered by the activator, so a probe never wakes a model."""
    if method != "GET":
        return False
    if path.startswith("/v2/models/"):
        parts = path[11:].split("/")
        if len(parts) == 4:
            return parts[1] == "versions" and parts[3] == "ready"
        return len(parts) == 2 and parts[1] == "ready"
    return path.startswith("/v1/models/") and ":" not in path and path.count("/") == 3


def field_one(message: bytes) -> str | None:
    """The string in field 1 of a serialized protobuf message, read without decoding the rest
    (tensors stay bytes); None when absent, not a string, or the message is malformed.

    Like a protobuf parser, the last field 1 wins, so the activator routes a message to the
    model its replica will read from it."""
    pos, end = 0, len(message)
    found: tuple[int, int] | None = None
    try:
        while pos < end:
            tag, pos = _varint(message, pos)
            number, wire = tag >> 3, tag & 7
            if number == 0:
                return None
            if wire == 2:
                length, pos = _varint(message, pos)
                if pos + length > end:
                    return None
                if number == 1:
                    found = (pos, pos + length)
                pos += length
            elif wire == 0:
                _, pos = _varint(message, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                return None
        if pos > end or found is None:
            return None
        return message[found[0] : found[1]].decode()
    except (IndexError, UnicodeDecodeError):
        return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")
