"""The test guests: tiny boot-sector images that check their own memory.

Theory of operation
-------------------
Each guest is a 512-byte PC boot sector (sources and the ``build.py`` that assembles
them live in the repository's top-level ``guests/`` directory).  It is loaded at
0x7c00 and entered in real mode as a BIOS would, switches to 32-bit protected mode
and then works only on the guest-physical range ``[range_start, range_end)``, which
it reads from a parameter block near the end of the sector::

    0x1f0  b"LMIG"         magic: the image is a livemig guest and may be patched
    0x1f4  u32 LE          range_start (bytes, 4 KiB aligned; default 1 MiB)
    0x1f8  u32 LE          range_end   (bytes, exclusive; usually the RAM size)
    0x1fc  2 bytes         reserved, 0
    0x1fe  0x55 0xaa       boot signature

Before starting a VM, livemig's VMM (and the QEMU tests) call :func:`patch_range` so
the range matches the VM's RAM.  Images without the magic are *foreign* boot sectors:
they run as they are and :func:`patch_range` leaves them alone.

The guests print ``B`` on the serial port after each pass over the range and ``E``
(then halt forever) when they find a page that lost an update; what exactly is
checked is described in ``livemig.vmm.checks``, which verifies the same invariants
from the host side on a paused VM.
"""

from __future__ import annotations

import struct
from importlib import resources
from os import PathLike
from typing import Final

from livemig.errors import ConfigError
from livemig.units import PAGE_SIZE

GUEST_NAMES: Final = ("ab", "random")

IMAGE_SIZE: Final = 512
LOAD_ADDRESS: Final = 0x7C00

MAGIC: Final = b"LMIG"
MAGIC_OFFSET: Final = 0x1F0
RANGE_START_OFFSET: Final = 0x1F4
RANGE_END_OFFSET: Final = 0x1F8
RESERVED_OFFSET: Final = 0x1FC
SIGNATURE_OFFSET: Final = 0x1FE
SIGNATURE: Final = b"\x55\xaa"

DEFAULT_RANGE_START: Final = 0x100000
DEFAULT_RANGE_END: Final = 256 << 20
# The guest's code (0x7c00..0x7dff) and stack (below 0x7c00) must stay outside the
# range it tests.  Under QEMU also keep clear of the VGA/ROM hole (use >= 1 MiB).
MIN_RANGE_START: Final = 0x8000
# Both bounds are u32 and the guest's page walk must not wrap around 4 GiB.
MAX_RANGE_END: Final = 0x1_0000_0000 - PAGE_SIZE

_RANGE = struct.Struct("<II")


def load_image(name: str) -> bytes:
    """Return the built-in guest image called ``name`` (one of :data:`GUEST_NAMES`)."""
    if name not in GUEST_NAMES:
        valid = ", ".join(GUEST_NAMES)
        raise ConfigError(f"Unknown guest {name!r}; valid guests are: {valid}.")
    data = resources.files(__name__).joinpath(f"{name}.bin").read_bytes()
    return _validated(data, f"built-in guest {name!r}")


def load_image_file(path: str | PathLike[str]) -> bytes:
    """Read a boot-sector image from ``path``: 512 bytes ending in 0x55 0xaa."""
    try:
        with open(path, "rb") as f:
            data = f.read(IMAGE_SIZE + 1)
    except OSError as e:
        raise ConfigError(f"Cannot read guest image {str(path)!r}: {e.strerror}.") from e
    return _validated(data, f"guest image {str(path)!r}")


def has_param_block(image: bytes) -> bool:
    """True if ``image`` carries the LMIG parameter block (a livemig guest)."""
    return image[MAGIC_OFFSET : MAGIC_OFFSET + len(MAGIC)] == MAGIC


def read_range(image: bytes) -> tuple[int, int] | None:
    """The ``(range_start, range_end)`` baked into ``image``; None for foreign images."""
    if not has_param_block(image):
        return None
    start, end = _RANGE.unpack_from(image, RANGE_START_OFFSET)
    return start, end


def patch_range(image: bytes, start: int, end: int) -> bytes:
    """Return ``image`` with its work range set to ``[start, end)``.

    Foreign images (no LMIG magic) are returned unchanged: they run as they are.
    """
    _validated(image, "guest image")
    if not has_param_block(image):
        return image
    _check_range(start, end)
    patched = bytearray(image)
    _RANGE.pack_into(patched, RANGE_START_OFFSET, start, end)
    return bytes(patched)


def _check_range(start: int, end: int) -> None:
    if start % PAGE_SIZE or end % PAGE_SIZE:
        raise ConfigError(
            f"Guest range [{start:#x}, {end:#x}) must be aligned to {PAGE_SIZE} bytes."
        )
    if not MIN_RANGE_START <= start < end <= MAX_RANGE_END:
        raise ConfigError(
            f"Guest range [{start:#x}, {end:#x}) must be non-empty and lie within "
            f"[{MIN_RANGE_START:#x}, {MAX_RANGE_END:#x})."
        )


def _validated(data: bytes, what: str) -> bytes:
    if len(data) != IMAGE_SIZE:
        size = "more" if len(data) > IMAGE_SIZE else str(len(data))
        raise ConfigError(f"The {what} must be exactly {IMAGE_SIZE} bytes, not {size}.")
    if data[SIGNATURE_OFFSET:] != SIGNATURE:
        raise ConfigError(f"The {what} lacks the 0x55 0xaa boot signature.")
    return data
