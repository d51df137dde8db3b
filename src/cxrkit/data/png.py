"""A check Pillow does not make: a PNG whose compressed pixel data ends cleanly but too soon.

When a PNG's zlib stream is complete (it ends with its end marker and checksum) yet holds fewer bytes than the
image needs, Pillow fills the missing rows with black and reports nothing; libpng refuses such a file ("Not enough
image data"). A file cut short is caught by its missing ``IEND``; this catches a writer that stopped early, or a
stream re-compressed from part of an image. The check inflates the pixel data a second time, without keeping it,
so :mod:`cxrkit.data.images` runs it only when the decoded image ends in black rows, as Pillow leaves the missing
ones.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: grey, RGB, palette, grey + alpha, RGBA
# Adam7 interlacing: each pass's first column and row, and its steps across and down
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PIECE = 1 << 20  # inflate at most this many bytes at a time: a 64-megapixel image is never held inflated


def _chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """``(type, body)`` of each chunk up to ``IEND`` (or the end of the data)."""
    pos = len(SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        yield kind, data[pos + 8:pos + 8 + length]
        if kind == b"IEND":
            return
        pos += 12 + length  # length, type, body, CRC


def needed_bytes(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int:
    """How many bytes the inflated pixel data of such an image holds: each row of each pass, plus its filter
    byte."""
    bits = bit_depth * _CHANNELS[colour_type]
    if interlaced:
        passes = [(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in _ADAM7]
    else:
        passes = [(width, height)]
    return sum(rows * (1 + (columns * bits + 7) // 8) for columns, rows in passes if columns > 0 and rows > 0)


def short_pixel_data(data: bytes) -> str | None:
    """Why the PNG ``data`` (which Pillow has decoded) lacks part of its pixels, or None. Damage Pillow already
    refuses (a bad header, a broken zlib stream) is left to it: None."""
    header, idat = None, []
    for kind, body in _chunks(data):
        if kind == b"IHDR" and len(body) >= 13:
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            idat.append(body)
    if header is None or header[3] not in _CHANNELS:
        return None
    width, height, bit_depth, colour_type, _, _, interlace = header
    needed = needed_bytes(width, height, bit_depth, colour_type, bool(interlace))
    inflater, got = zlib.decompressobj(), 0
    try:
        for body in idat:
            pending = body
            while pending and got < needed and not inflater.eof:
                got += len(inflater.decompress(pending, _PIECE))
                pending = inflater.unconsumed_tail
            if got >= needed or inflater.eof:
                break
    except zlib.error:
        return None
    if got >= needed:
        return None
    return f"PNG pixel data ends early: {got:,} of the {needed:,} bytes a {width}x{height} image needs"
