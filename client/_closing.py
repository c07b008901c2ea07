"""Objects that close what they hold when a `with` (or `async with`) block ends."""

from __future__ import annotations

from typing import TypeVar

S = TypeVar("S", bound="Closing")
A = TypeVar("A", bound="AsyncClosing")


class Closing:
    """`with thing:` calls `thing.close()` at the end of the block, however it ends."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClosing:
    """`async with thing:` awaits `thing.close()` at the end of the block, however it ends."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: A) -> A:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
