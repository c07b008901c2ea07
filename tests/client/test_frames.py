"""Reassembling a framed result: freed message buffers go back to the system as it streams."""

from __future__ import annotations

import pytest
from gradtap.client import _frames

from gradtap.v1 import gradtap_pb2 as pb


def test_a_big_stream_returns_freed_heap_memory_every_32_mib(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[int] = []
    monkeypatch.setattr(_frames, "_trim", trims.append)
    header = pb.AnalyzeHeader()
    header.tensors.add(id=0, dtype=pb.DTYPE_UINT8, shape=[100 << 20], byte_size=100 << 20)
    frames = _frames.Frames()
    frames.feed(header, [])
    data = memoryview(bytes(1 << 20))
    for k in range(100):
        frames.feed(None, [_frames.RawChunk(0, k << 20, data)])
    frames.finish(1)
    assert trims == [0, 0, 0]  # at 32, 64 and 96 MiB
    assert frames.arrays[0].nbytes == 100 << 20


def test_the_trim_is_glibcs_where_there_is_glibc() -> None:
    import platform

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert (_frames._malloc_trim() is not None) == glibc
