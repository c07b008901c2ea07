"""The same-host transport, client side: a shared-memory region that the server writes a
result into instead of streaming it (docs/shared-memory.md).

The standard library's multiprocessing.shared_memory cannot serve here: its arrays must
not outlive the SharedMemory object (closing it with views alive raises), and it starts a
resource-tracker process. A region here is a file in /dev/shm, mapped once; the arrays of
a result hold the mapping, so they stay valid after the region is closed.
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
from pathlib import Path

import numpy as np

from gradtap.v1 import gradtap_pb2 as pb

from ._closing import Closing
from ._errors import GradtapError
from ._tensor import NUMPY_DTYPES

DIRECTORY = Path("/dev/shm")
DATA_START = 64
"""The server writes tensor bytes from this offset on; the token sits before it."""


class SharedRegion(Closing):
    """A region of this host's shared memory that a gradtap server can write results into.

    Pass it as analyze(..., shared_memory=region) to a server started with
    --shared-memory on this host. Reusing one region is the fastest way to move big results:
    its pages are allocated and mapped once. The arrays of a result written into the region
    are views of it, valid until the region's next use: copy them (np.copy) to keep them
    longer. Closing the region removes its name; arrays still in use keep their memory.

    Args:
        size: bytes; the result's tensors need their sizes, each rounded up to 64, plus 64.
            Memory is only spent as the server writes.
        mode: file permissions. The server uses only a region that no one but its owner
            may read or write (0o600, the default, or stricter), so it must run as the
            same user.

    Raises:
        OSError: this host has no /dev/shm (gradtap's shared memory needs Linux).
    """

    def __init__(self, size: int, *, mode: int = 0o600) -> None:
        if size < DATA_START:
            raise ValueError(f"size must be at least {DATA_START} bytes")
        self.name = f"gradtap-{secrets.token_hex(16)}"
        self.size = size
        self._token = secrets.token_bytes(32)
        self._path = DIRECTORY / self.name
        fd = os.open(
            self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, mode
        )
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, self._token, 0)
            self._map: mmap.mmap | None = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(self._path)
            raise
        finally:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SharedRegion({self.name!r}, size={self.size})"

    @property
    def closed(self) -> bool:
        return self._map is None

    def close(self) -> None:
        """Removes the region's name; arrays still in use keep its memory until they go."""
        if getattr(self, "_map", None) is None:
            return
        self._map = None
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass

    def message(self) -> pb.SharedMemoryRegion:
        """The request field that names this region."""
        if self._map is None:
            raise ValueError(f"{self!r} is closed")
        return pb.SharedMemoryRegion(name=self.name, size=self.size, token=self._token)

    def array(self, header: pb.TensorHeader) -> np.ndarray | None:
        """A view of one tensor the server wrote; None where the header points outside the
        region's data."""
        dtype = NUMPY_DTYPES.get(header.dtype)
        if self._map is None or dtype is None or any(d < 0 for d in header.shape):
            return None
        offset, count = header.region_offset, math.prod(header.shape)
        if count * dtype.itemsize == header.byte_size == 0:
            return np.empty(tuple(header.shape), dtype=dtype)
        if (
            offset < DATA_START
            or offset % dtype.itemsize
            or count * dtype.itemsize != header.byte_size
            or offset + header.byte_size > self.size
        ):
            return None
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(
            tuple(header.shape)
        )


class Regions:
    """Where one analyze() call asks the server to write: nowhere (False), the caller's
    region, or (True) a fresh region per call, remade bigger when the server says it is too
    small. `sizes` remembers, per model, the size the server last asked for."""

    FIRST_SIZE = 64 << 20
    ATTEMPTS = 3

    def __init__(self, choice: bool | SharedRegion, sizes: dict[str, int], model: str) -> None:
        if not isinstance(choice, (bool, SharedRegion)):
            raise TypeError("shared_memory must be True, False or a SharedRegion")
        self._choice = choice
        self._sizes = sizes
        self._model = model
        self._own: SharedRegion | None = None
        self._attempts = 0

    def open(self, request: pb.AnalyzeRequest) -> SharedRegion | None:
        """The region for the next attempt, named in `request`."""
        self.close()
        region: SharedRegion | None = None
        if isinstance(self._choice, SharedRegion):
            region = self._choice
        elif self._choice:
            region = self._own = SharedRegion(self._sizes.get(self._model, self.FIRST_SIZE))
        if region is None:
            request.ClearField("shared_memory")
        else:
            request.shared_memory.CopyFrom(region.message())
        self._attempts += 1
        return region

    def grow(self, error: GradtapError) -> bool:
        """Whether to try again after `error`, with a region of the size it asks for."""
        required = error.details.metadata.get("required_bytes", "")
        if (
            self._own is None
            or error.reason != "SHARED_MEMORY_TOO_SMALL"
            or not required.isdigit()
            or self._attempts >= self.ATTEMPTS
        ):
            return False
        self._sizes[self._model] = max(int(required), self._sizes.get(self._model, 0))
        return True

    def close(self) -> None:
        """Removes a region made for this call (its arrays keep their memory)."""
        if self._own is not None:
            self._own.close()
            self._own = None
