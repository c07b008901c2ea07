"""The same-host transport: writing a result's tensors into a shared-memory region that the
client created, instead of streaming them.

Security comes first (docs/shared-memory.md):
- it is off unless the server was started with --shared-memory;
- the caller must be on this host (loopback or a Unix socket);
- the server opens only a name the client gave, in the shared-memory directory, with the
  "gradtap-" prefix, never following a link, and only a plain file of exactly the declared
  size that only its owner may read or write, whose first TOKEN_BYTES bytes are the
  client's random token (the whole token: a shorter one is refused before any file is
  opened); every failure gets one and the same message, so a caller learns nothing about
  files it could not open itself;
- it writes with pwrite() and never maps the region, so a region truncated or a filesystem
  filled meanwhile is an error for that call (ENOSPC), not a SIGBUS for the server;
- nothing is ever read from the region except the token.
"""

from __future__ import annotations

import errno
import hmac
import os
import re
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FailedPrecondition, InvalidArgument, ResourceExhausted

DIRECTORY = Path("/dev/shm")
"""Where POSIX shared-memory objects live on Linux."""

NAME = re.compile(r"gradtap-[A-Za-z0-9_-]{8,128}")
TOKEN_BYTES = 32
"""The token's length: a request must send all of it, as the client wrote it."""
_TOKEN_DISTINCT = 8
"""Fewest distinct byte values in a token: 32 random bytes hold about 30, and a region's
zeroed start (a region made but not yet written) is never a token."""
_PRIVATE = 0o077
"""Permission bits of anyone but the owner: a region with any of them set is refused."""
DATA_START = 64
"""Tensor bytes start here; the token sits before."""
ALIGN = 64
_WRITE_BYTES = 64 << 20
"""Most bytes per pwrite() call (Linux writes at most about 2 GiB at once)."""


@dataclass(frozen=True)
class RegionRequest:
    """What the client asked: a region's name, its size and the token at its start."""

    name: str
    size: int
    token: bytes


def is_local(peer: str) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5000", "unix:/run/x.sock") is this host."""
    return (
        peer.startswith(("unix:", "unix-abstract:"))
        or peer.startswith("ipv4:127.")
        or peer.startswith("ipv6:[::1]:")
        or peer.startswith("ipv6:[::ffff:127.")
    )


def layout(byte_sizes: Sequence[int]) -> tuple[list[int], int]:
    """Each tensor's offset in a region, 64-byte aligned after the token, and the region
    size they need."""
    offsets, end = [], DATA_START
    for nbytes in byte_sizes:
        offsets.append(end)
        end += -(-nbytes // ALIGN) * ALIGN
    return offsets, end


def too_small(request: RegionRequest, needed: int) -> ResourceExhausted:
    """The error for a region that cannot hold the result; it says how big it must be."""
    return ResourceExhausted(
        f"shared_memory.size is {request.size} bytes; this result needs {needed}",
        reason="SHARED_MEMORY_TOO_SMALL",
        field="shared_memory.size",
        metadata={"required_bytes": str(needed)},
    )


def check_request(request: RegionRequest, *, enabled: bool, local: bool) -> None:
    """The checks that need no file: the server's switch, the caller's host, name, token."""
    if not enabled:
        raise FailedPrecondition(
            "this server does not offer shared memory (start it with --shared-memory)",
            reason="SHARED_MEMORY_DISABLED",
            field="shared_memory",
        )
    if not local:
        raise FailedPrecondition(
            "shared memory needs a caller on the server's host (loopback or a Unix socket)",
            reason="SHARED_MEMORY_NOT_LOCAL",
            field="shared_memory",
        )
    if not NAME.fullmatch(request.name):
        raise InvalidArgument(
            f"shared_memory.name must match {NAME.pattern}",
            reason="BAD_SHARED_MEMORY",
            field="shared_memory.name",
        )
    if len(request.token) != TOKEN_BYTES or len(set(request.token)) < _TOKEN_DISTINCT:
        raise InvalidArgument(
            f"shared_memory.token must be the {TOKEN_BYTES} random bytes written at the "
            f"region's start (this one has {len(request.token)})",
            reason="BAD_SHARED_MEMORY",
            field="shared_memory.token",
        )
    if request.size < DATA_START:
        raise InvalidArgument(
            f"shared_memory.size must be at least {DATA_START}",
            reason="BAD_SHARED_MEMORY",
            field="shared_memory.size",
        )


class Region:
    """A client's region, open for writing within its declared size."""

    def __init__(self, fd: int, request: RegionRequest) -> None:
        self._fd = fd
        self.request = request

    def write(self, tensors: Sequence[torch.Tensor]) -> list[int]:
        """Writes host tensors one after another; returns their offsets."""
        offsets, needed = layout([t.numel() * t.element_size() for t in tensors])
        if needed > self.request.size:
            raise too_small(self.request, needed)
        for offset, tensor in zip(offsets, tensors):
            raw = tensor.reshape(-1).view(torch.uint8).numpy().data
            done = 0
            while done < len(raw):
                try:
                    done += os.pwrite(self._fd, raw[done : done + _WRITE_BYTES], offset + done)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                        raise ResourceExhausted(
                            "the host's shared-memory filesystem is full",
                            reason="SHARED_MEMORY_FULL",
                            field="shared_memory",
                        ) from None
                    raise
        return offsets


_UNUSABLE = (
    "shared_memory does not name a region this server can use: it must exist, be a plain "
    "file of exactly shared_memory.size bytes and start with shared_memory.token"
)


@contextmanager
def opened(request: RegionRequest, directory: Path = DIRECTORY) -> Iterator[Region]:
    """Opens the client's region after checking it; closes it when the call is done.

    Whatever fails (missing, a link, a directory, another size, another token, no
    permission, open to other users) the caller gets the same FAILED_PRECONDITION.
    """
    unusable = FailedPrecondition(
        _UNUSABLE, reason="SHARED_MEMORY_UNUSABLE", field="shared_memory.name"
    )
    try:
        fd = os.open(
            directory / request.name,
            os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY,
        )
    except OSError:
        raise unusable from None
    try:
        info = os.fstat(fd)
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_mode & _PRIVATE
            or info.st_uid != os.geteuid()
            or info.st_nlink != 1
            or info.st_size != request.size
            or not hmac.compare_digest(os.pread(fd, TOKEN_BYTES, 0), request.token)
        ):
            raise unusable
        yield Region(fd, request)
    finally:
        os.close(fd)
