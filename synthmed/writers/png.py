"""PNG writer: 8- or 16-bit grayscale with text chunks, deterministic bytes.

Example:
    >>> import numpy as np
    >>> data = png_bytes(np.zeros((8, 8), np.uint16), {"synthetic": "yes"})
    >>> data[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import struct
import zlib

import numpy as np


def to_stored(pixels: np.ndarray, bit_depth: int) -> np.ndarray:
    """Float image in [0, 1] -> the stored integers: 12-bit in uint16 (bit_depth 16) or uint8 (bit_depth 8).

    The 12-bit values are what DICOM stores (BitsStored 12); :func:`png_values` widens them for PNG.
    """
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D (height, width), got shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise ValueError("pixels contain NaN or infinity")
    x = np.clip(pixels.astype(np.float64), 0.0, 1.0)
    if bit_depth == 8:
        return np.rint(x * 255.0).astype(np.uint8)
    if bit_depth == 16:
        return np.rint(x * 4095.0).astype(np.uint16)
    raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")


def png_values(stored: np.ndarray) -> np.ndarray:
    """Stored values -> PNG samples: uint8 as is; 12-bit by bit replication to the full 16-bit range.

    ``png_values(v) >> 4 == v`` exactly, so the DICOM pixels can be recovered from the PNG.
    """
    if stored.dtype == np.uint8:
        return stored
    if stored.dtype == np.uint16:
        return (stored << 4) | (stored >> 8)
    raise ValueError(f"stored pixels must be uint8 or uint16, got {stored.dtype}")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_bytes(samples: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """Encode a 2-D uint8, uint16 or bool array as grayscale PNG with tEXt chunks (in the given order).

    Written directly (filter type 0, zlib level 1) rather than through Pillow: three times
    faster on 16-bit images, and the bytes depend only on the pixels, the text and zlib.
    Text goes in tEXt chunks, or iTXt (UTF-8) where it is not Latin-1.
    """
    if samples.ndim != 2 or samples.dtype not in (np.uint8, np.uint16, np.bool_):
        raise ValueError(f"samples must be a 2-D uint8/uint16/bool array, got {samples.dtype} {samples.shape}")
    if samples.dtype == np.bool_:
        samples = samples.astype(np.uint8) * 255
    height, width = samples.shape
    depth = 16 if samples.dtype == np.uint16 else 8
    rows = np.ascontiguousarray(samples.astype(">u2" if depth == 16 else np.uint8)).view(np.uint8).reshape(height, -1)
    raw = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    raw[:, 0] = 0  # filter type None on every row
    raw[:, 1:] = rows
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0))]
    for key, value in (text or {}).items():
        keyword = key.encode("latin-1", "replace")[:79]
        try:
            out.append(_chunk(b"tEXt", keyword + b"\x00" + str(value).encode("latin-1")))
        except UnicodeEncodeError:  # iTXt carries UTF-8
            out.append(_chunk(b"iTXt", keyword + b"\x00\x00\x00\x00\x00" + str(value).encode("utf-8")))
    out += [_chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)), _chunk(b"IEND", b"")]
    return b"".join(out)
