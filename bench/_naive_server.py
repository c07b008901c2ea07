"""The naive remote approach a user might write: a whole tensor in one unary gRPC message.

Run as `python -m bench._naive_server`; prints `naive serving on HOST:PORT`. Two methods take an
8-byte little-endian size N and answer N bytes of float32: `/naive.Tensors/Raw` returns the
tensor's raw bytes, `/naive.Tensors/TorchSave` returns `torch.save` of it (made per call, as
such a server would). Two more give the small-call floor of a bare grpcio server, answering 100
bytes: `/naive.Tensors/Ping` (unary) and `/naive.Tensors/PingStream` (one streamed message, like
a small Analyze result).
"""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import torch

PONG = bytes(100)

MESSAGE_LIMIT = (1 << 31) - 1
"""The raised message limit such an approach needs (gRPC's maximum)."""


class Tensors:
    def __init__(self) -> None:
        self._cache: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def tensor(self, size: int) -> torch.Tensor:
        with self._lock:
            if size not in self._cache:
                self._cache.clear()
                self._cache[size] = torch.ones(size // 4, dtype=torch.float32).reshape(-1, 1024)
            return self._cache[size]

    def raw(self, request: bytes, context: Any) -> bytes:
        (size,) = struct.unpack("<Q", request)
        return self.tensor(size).numpy().tobytes()

    def ping(self, request: bytes, context: Any) -> bytes:
        return PONG

    def ping_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        yield PONG

    def torch_save(self, request: bytes, context: Any) -> bytes:
        (size,) = struct.unpack("<Q", request)
        buffer = io.BytesIO()
        torch.save(self.tensor(size), buffer)
        return buffer.getvalue()


def main() -> None:
    tensors = Tensors()
    handler = grpc.method_handlers_generic_handler(
        "naive.Tensors",
        {
            "Raw": grpc.unary_unary_rpc_method_handler(tensors.raw),
            "TorchSave": grpc.unary_unary_rpc_method_handler(tensors.torch_save),
            "Ping": grpc.unary_unary_rpc_method_handler(tensors.ping),
            "PingStream": grpc.unary_stream_rpc_method_handler(tensors.ping_stream),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        handlers=[handler],
        options=[
            ("grpc.max_send_message_length", MESSAGE_LIMIT),
            ("grpc.max_receive_message_length", MESSAGE_LIMIT),
        ],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"naive serving on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
