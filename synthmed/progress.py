"""The progress bar every long command shows (tqdm on stderr, off when asked or when not a terminal).

Example:
    >>> bar = progress_bar(3, enabled=False)
    >>> bar.update(3); bar.close()
"""

from __future__ import annotations

import sys


def progress_bar(total: int, enabled: bool):
    """A tqdm bar over ``total`` images; ``enabled=False`` hides it, None leaves it to tqdm (no tty: off)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled or None, dynamic_ncols=True, file=sys.stderr)
