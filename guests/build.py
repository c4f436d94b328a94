#!/usr/bin/env python3
"""Assemble the test guests into the images shipped in ``livemig/guests/``.

Theory of operation
-------------------
Every ``*.asm`` named in ``GUESTS`` is assembled by NASM as a flat binary (``-f bin``):
the boot sectors (exactly 512 bytes) and the multiboot kernel ``os``,
with this directory on the include path for the shared ``boot.inc``.  Flat-binary
output is deterministic, so the checked-in images can be verified: ``--check``
assembles into a temporary directory and compares byte for byte, exiting 1 if any
checked-in image is stale or missing (run it in CI after editing a source).

Usage::

    python guests/build.py            # rebuild livemig/guests/*.bin
    python guests/build.py --check    # verify them; exit 1 on mismatch
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> exact image size (boot sectors), or None (multiboot kernels)
GUESTS: dict[str, int | None] = {"ab": 512, "random": 512, "os": None}
SOURCE_DIR = Path(__file__).resolve().parent
IMAGE_DIR = SOURCE_DIR.parent / "livemig" / "guests"


def assemble(nasm: str, name: str, out_dir: Path) -> Path:
    """Assemble ``guests/<name>.asm`` into ``out_dir/<name>.bin`` and return its path."""
    out = out_dir / f"{name}.bin"
    # NASM wants the include directory with a trailing separator.
    source = SOURCE_DIR / f"{name}.asm"
    cmd = [nasm, "-f", "bin", "-I", f"{SOURCE_DIR}/", "-o", str(out), str(source)]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"{source}: nasm failed")
    size = out.stat().st_size
    if GUESTS[name] not in (None, size):
        raise SystemExit(f"{out}: {size} bytes, expected {GUESTS[name]}")
    return out


def build(nasm: str) -> int:
    for name in GUESTS:
        out = assemble(nasm, name, IMAGE_DIR)
        print(f"built {out}")
    return 0


def check(nasm: str) -> int:
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in GUESTS:
            fresh = assemble(nasm, name, Path(tmp)).read_bytes()
            shipped = IMAGE_DIR / f"{name}.bin"
            if not shipped.exists() or shipped.read_bytes() != fresh:
                stale.append(str(shipped))
    for path in stale:
        print(f"stale or missing: {path} (run guests/build.py)", file=sys.stderr)
    return 1 if stale else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--nasm", default="nasm", help="NASM executable (default: nasm)")
    args = parser.parse_args(argv)
    nasm = shutil.which(args.nasm)
    if nasm is None:
        print(f"{args.nasm}: not found; install NASM", file=sys.stderr)
        return 2
    return check(nasm) if args.check else build(nasm)


if __name__ == "__main__":
    sys.exit(main())
