"""The read sizes a codec test feeds every stream at (a whole buffer down to one byte), and
the stream cut into them."""

from __future__ import annotations

from collections.abc import Iterator

READ_SIZES = [4096, 128, 16, 1]


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
