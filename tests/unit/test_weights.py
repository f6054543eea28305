"""The safetensors header parser, tensors placed piece by piece, the staging ring, the handoff
from a download that started before anyone could take its bytes, and the loader using them."""

from __future__ import annotations

import os
import random
import struct
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from safetensors.torch import load_file, save, save_file

from ember.server import loading
from ember.server.imports import LoadError
from ember.server.storage.sinks import FileSink
from ember.server.weights.handoff import Handoff, coalesce
from ember.server.weights.header import (
    FIRST_READ,
    MAX_HEADER_BYTES,
    HeaderError,
    parse_header,
    read_header,
)
from ember.server.weights.mode import stream_mode
from ember.server.weights.placement import StagingRing, TensorPlacement

CPU = torch.device("cpu")


def sample_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "weight": torch.randn(300, 70),
        "bias": torch.randn(70, dtype=torch.float64),
        "steps": torch.arange(11, dtype=torch.int64),
        "half": torch.randn(3, 5, dtype=torch.float16),
        "brain": torch.randn(7, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "mask": torch.rand(9) > 0.5,
        "bytes": torch.randint(0, 255, (13,), dtype=torch.uint8),
        "small": torch.randint(-9, 9, (6,), dtype=torch.int16),
        "wave": torch.randn(4, dtype=torch.complex64),
        "fp8": torch.randn(8).to(torch.float8_e4m3fn),
        "fp8_fnuz": torch.randn(8).to(torch.float8_e5m2fnuz),
        "wide": torch.arange(5, dtype=torch.int32).to(torch.uint32),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def raw_file(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A file with exactly this header (no validation by the safetensors package)."""
    text = header if isinstance(header, bytes) else orjson.dumps(header)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


# --- the header -----------------------------------------------------------------------------


def test_header_of_a_real_file_tiles_the_data_in_order() -> None:
    state = sample_state()
    data = save(state, metadata={"format": "pt"})
    header = parse_header(data, len(data))
    assert header.metadata == {"format": "pt"}
    assert {e.name for e in header.tensors} == set(state)
    assert header.tensors[0].begin == header.data_start
    assert header.tensors[-1].end == len(data)
    for before, after in zip(header.tensors, header.tensors[1:], strict=False):
        assert before.end == after.begin
    by_name = {e.name: e for e in header.tensors}
    assert by_name["weight"].shape == (300, 70) and by_name["weight"].dtype == "F32"
    assert by_name["scalar"].shape == () and by_name["scalar"].nbytes == 4
    assert by_name["empty"].nbytes == 0 and by_name["brain"].dtype == "BF16"


def one(dtype: str = "F32", shape: Any = (2,), offsets: Any = (0, 8), **extra: Any) -> dict:
    return {"t": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}}


@pytest.mark.parametrize(
    ("file", "message"),
    [
        (b"\x01\x02", "too short"),
        (raw_file(b"{}", length=MAX_HEADER_BYTES + 1), "over the limit"),
        (raw_file(b"{}", length=400), "runs past the end"),
        (raw_file(b"{not json"), "not valid JSON"),
        (raw_file(b"[1, 2]"), "must be a JSON object, got list"),
        (
            raw_file(b'{"t": {"dtype": "F32"}, "t": ' + orjson.dumps(one()["t"]) + b"}", b"\0" * 8),
            "'t' appears twice",
        ),
        (raw_file({"t": 3}), "tensor 't': expected an object"),
        (raw_file(one(dtype="F128"), b"\0" * 8), "tensor 't': dtype 'F128' is not one of"),
        (raw_file(one(dtype=None), b"\0" * 8), "tensor 't': dtype None"),
        (raw_file(one(dtype=[2]), b"\0" * 8), "tensor 't': dtype [2]"),
        (raw_file(one(shape=[-1]), b"\0" * 8), "tensor 't': shape must be"),
        (raw_file(one(shape=[2.0]), b"\0" * 8), "tensor 't': shape must be"),
        (raw_file(one(shape=[True]), b"\0" * 8), "tensor 't': shape must be"),
        (raw_file(one(shape=[1] * 65), b"\0" * 8), "tensor 't': shape must be"),
        (raw_file(one(shape=[0, 2**64 - 1], offsets=[0, 0])), "fits in 64 bits"),
        (raw_file(one(shape=[2**40, 2**40, 0], offsets=[0, 0])), "fits in 64 bits"),
        (raw_file(one(offsets=[0]), b"\0" * 8), "data_offsets must be"),
        (raw_file(b'{"t":{"dtype":"U8","shape":[2],"data_offsets":[-0,2]}}', b"\0\0"), "-0"),
        (raw_file(one(offsets=[8, 0]), b"\0" * 8), "data_offsets must be"),
        (raw_file(one(offsets=[0, "8"]), b"\0" * 8), "data_offsets must be"),
        (raw_file(one(offsets=[0, 12]), b"\0" * 12), "12 bytes for shape [2] of F32"),
        (raw_file(one(kind="x"), b"\0" * 8), "unknown field(s) kind"),
        (raw_file(one(offsets=[4, 12]), b"\0" * 12), "leaves a gap before it (offset 4)"),
        (raw_file(one(), b"\0" * 4), "end at byte"),
        (raw_file(one(), b"\0" * 9), "trailing bytes"),
        (raw_file({**one(), "__metadata__": {"a": 1}}, b"\0" * 8), "__metadata__ must map"),
        (
            raw_file(
                {**one(), "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8
            ),
            "tensor 'u' overlaps the one before it",
        ),
    ],
)
def test_bad_headers_are_refused_with_the_reason(file: bytes, message: str) -> None:
    with pytest.raises(HeaderError, match=None) as caught:
        parse_header(file, len(file))
    assert message in str(caught.value)


def test_an_unknown_dtype_names_the_supported_ones() -> None:
    file = raw_file(one(dtype="C128"), b"\0" * 8)
    with pytest.raises(HeaderError, match="BF16"):
        parse_header(file, len(file))


def test_a_header_cut_short_is_refused() -> None:
    data = save(sample_state())
    with pytest.raises(HeaderError, match="need"):
        parse_header(data[:20], len(data))


def test_read_header_asks_for_nothing_from_a_file_too_short() -> None:
    def read(start: int, end: int) -> bytes:
        raise AssertionError("no read for an empty object")

    with pytest.raises(HeaderError, match="too short"):
        read_header(0, read)


def test_read_header_reads_twice_only_for_a_long_header() -> None:
    reads: list[tuple[int, int]] = []
    small = save(sample_state())
    big = save({f"tensor_{i:05d}": torch.zeros(1) for i in range(3000)})
    assert len(big) > FIRST_READ

    def reader(data: bytes) -> Any:
        def read(start: int, end: int) -> bytes:
            reads.append((start, end))
            return data[start:end]

        return read

    read_header(len(small), reader(small))
    assert reads == [(0, min(len(small), FIRST_READ))]
    reads.clear()
    header = read_header(len(big), reader(big))
    assert len(reads) == 2 and reads[1] == (FIRST_READ, header.data_start)
    assert len(header.tensors) == 3000


# --- placement ------------------------------------------------------------------------------


def shuffled_pieces(size: int, count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, size), count))
    pieces = list(zip([0, *cuts], [*cuts, size], strict=True))
    rng.shuffle(pieces)
    return pieces


def write_from_threads(target: Any, data: bytes, pieces: list[tuple[int, int]], n: int) -> None:
    view = memoryview(data)
    errors: list[BaseException] = []

    def work(share: list[tuple[int, int]]) -> None:
        try:
            for start, end in share:
                # A fresh buffer per piece that is overwritten afterwards, as the downloader
                # reuses its own: a placement must be done with the bytes when it returns.
                buffer = bytearray(view[start:end])
                target.write_at(start, memoryview(buffer))
                buffer[:] = b"\xff" * len(buffer)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(pieces[i::n],)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("ring_slots", [None, 1, 3])
def test_pieces_in_any_order_from_many_threads_build_the_same_tensors(
    ring_slots: int | None,
) -> None:
    state = sample_state()
    data = save(state)
    header = parse_header(data, len(data))
    # A 1000-byte slot is smaller than many pieces: the ring cuts them.
    ring = None if ring_slots is None else StagingRing(CPU, slots=ring_slots, slot_bytes=1000)
    placement = TensorPlacement(header, CPU, ring)
    write_from_threads(placement, data, shuffled_pieces(len(data), 60, seed=1), n=8)
    placement.finish()
    assert_same(placement.tensors, state)
    if ring is not None:
        assert ring.host_bytes == ring_slots * 1000
        assert ring.copies >= (len(data) - header.data_start) // 1000


def test_finish_refuses_tensors_that_did_not_all_arrive() -> None:
    data = save(sample_state())
    placement = TensorPlacement(parse_header(data, len(data)), CPU)
    placement.write_at(0, memoryview(data)[: len(data) - 10])
    with pytest.raises(RuntimeError, match="placed"):
        placement.finish()


def test_abort_lets_go_of_the_tensors() -> None:
    data = save(sample_state())
    placement = TensorPlacement(parse_header(data, len(data)), CPU)
    placement.abort()
    assert placement.tensors == {}


def test_ring_needs_slots() -> None:
    with pytest.raises(ValueError, match="slots"):
        StagingRing(CPU, slots=0)


# --- the handoff ----------------------------------------------------------------------------


def file_sink(tmp_path: Path, size: int) -> FileSink:
    return FileSink.create(tmp_path / "partial", size)


def test_a_handoff_gives_the_bytes_written_before_and_after_attaching(tmp_path: Path) -> None:
    state = sample_state()
    data = save(state)
    header = parse_header(data, len(data))
    pieces = shuffled_pieces(len(data), 40, seed=2)
    sink = file_sink(tmp_path, len(data))
    handoff = Handoff(header, sink)

    class Tee:
        def write_at(self, offset: int, piece: memoryview) -> None:
            sink.write_at(offset, piece)
            handoff.write_at(offset, piece)

    early, late = pieces[:25], pieces[25:]
    write_from_threads(Tee(), data, early, n=4)
    placement = TensorPlacement(header, CPU)
    attached = threading.Thread(target=handoff.attach, args=(placement, 30))
    attached.start()
    write_from_threads(Tee(), data, late, n=4)
    sink.close()  # the download's own descriptor goes; the handoff kept a duplicate
    handoff.finish()
    attached.join(30)
    assert not attached.is_alive()
    placement.finish()
    assert_same(placement.tensors, state)


def test_a_target_that_fails_is_detached_while_the_download_goes_on(tmp_path: Path) -> None:
    data = save(sample_state())
    header = parse_header(data, len(data))
    sink = file_sink(tmp_path, len(data))
    handoff = Handoff(header, sink)
    half = len(data) // 2
    sink.write_at(0, memoryview(data)[:half])
    handoff.write_at(0, memoryview(data)[:half])

    class Failing(TensorPlacement):
        def read_file(self, fd: int, extents: list[tuple[int, int]]) -> None:
            raise OSError("disk gone")

        def write_at(self, offset: int, piece: memoryview) -> None:
            raise AssertionError("a detached target was written to")

    with pytest.raises(OSError, match="disk gone"):
        handoff.attach(Failing(header, CPU), timeout=5)
    # The download carries on into the file; the failed target never sees it.
    sink.write_at(half, memoryview(data)[half:])
    handoff.write_at(half, memoryview(data)[half:])
    handoff.finish()


def test_a_failed_download_fails_the_attach(tmp_path: Path) -> None:
    data = save(sample_state())
    header = parse_header(data, len(data))
    handoff = Handoff(header, file_sink(tmp_path, len(data)))
    handoff.abort()
    with pytest.raises(OSError, match="failed"):
        handoff.attach(TensorPlacement(header, CPU), timeout=5)


def test_a_handoff_is_attached_once_and_not_after_release(tmp_path: Path) -> None:
    data = save(sample_state())
    header = parse_header(data, len(data))
    sink = file_sink(tmp_path, len(data))
    opened = len(os.listdir("/proc/self/fd"))
    handoff = Handoff(header, sink)
    handoff.release()
    assert len(os.listdir("/proc/self/fd")) == opened  # its duplicate descriptor is closed
    with pytest.raises(RuntimeError, match="once"):
        handoff.attach(TensorPlacement(header, CPU))


def test_reading_a_file_shorter_than_its_header_says_fails(tmp_path: Path) -> None:
    data = save(sample_state())
    path = tmp_path / "short"
    path.write_bytes(data[:-100])
    for ring in (None, StagingRing(CPU, slots=2, slot_bytes=4096)):
        placement = TensorPlacement(parse_header(data, len(data)), CPU, ring)
        with path.open("rb") as file, pytest.raises(OSError, match="ended at byte"):
            placement.read_file(file.fileno(), [(0, len(data))])


@pytest.mark.parametrize("ring_slots", [None, 2])
def test_extents_of_a_file_read_into_place(tmp_path: Path, ring_slots: int | None) -> None:
    state = sample_state()
    data = save(state)
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    ring = None if ring_slots is None else StagingRing(CPU, slots=ring_slots, slot_bytes=4096)
    placement = TensorPlacement(parse_header(data, len(data)), CPU, ring)
    # Two runs with a piece between them written the other way, as a handoff does.
    third = len(data) // 3
    placement.write_at(third, memoryview(data)[third : 2 * third])
    with path.open("rb") as file:
        placement.read_file(file.fileno(), [(0, third), (2 * third, len(data))], threads=3)
    placement.finish()
    assert_same(placement.tensors, state)


def test_coalesce_joins_touching_pieces_in_order() -> None:
    assert coalesce([(10, 5), (0, 10), (20, 1), (15, 2)]) == [(0, 17), (20, 21)]
    assert coalesce([]) == []


# --- the loader -----------------------------------------------------------------------------


def test_stream_mode_reads_the_environment() -> None:
    assert stream_mode({}) == "auto"
    assert stream_mode({"EMBER_STREAM_WEIGHTS": " Always "}) == "always"
    with pytest.raises(LoadError, match="EMBER_STREAM_WEIGHTS must be one of auto, always"):
        stream_mode({"EMBER_STREAM_WEIGHTS": "sometimes"})


def test_a_local_file_placed_equals_the_safetensors_package(tmp_path: Path) -> None:
    state = sample_state()
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    assert_same(loading._place_file(path, CPU), load_file(str(path)))


def test_a_file_the_parser_refuses_is_left_to_the_safetensors_package(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(raw_file(one(dtype="F8_E8M0", shape=[8]), b"\0" * 8))
    with caplog.at_level("INFO", logger="ember.server.loading"):
        assert loading._place_file(path, CPU) is None
    assert "w.safetensors: weights loaded by the safetensors package, not streamed" in caplog.text


def test_every_dtype_the_parser_knows_is_one_torch_places() -> None:
    from ember.server.weights.header import ITEMSIZE
    from ember.server.weights.placement import TORCH_DTYPES

    assert ITEMSIZE.keys() == TORCH_DTYPES.keys()
    assert all(TORCH_DTYPES[name].itemsize == size for name, size in ITEMSIZE.items())
