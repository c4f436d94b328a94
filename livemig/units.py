"""Units every layer counts in: the page and the binary size multiples.

Theory of operation
-------------------
livemig moves guest RAM in 4 KiB pages.  The number is one fact seen from two sides:
it is x86's base page (the unit in which the kernel maps anonymous memory and in which
KVM logs dirty pages, :mod:`livemig.kernel`), and it is QEMU's ``TARGET_PAGE_SIZE``, the
unit of every RAM record of the migration stream (:mod:`livemig.wire`).  It lives here,
in a module that imports nothing, rather than in either layer: ``wire/`` is sans-IO and
must not depend on ``kernel/``, and the kernel bindings have no business importing the
stream's protocol tables.  Both layers, and everything above them, import it from here.
"""

from __future__ import annotations

from typing import Final

KIB: Final = 1024
MIB: Final = 1024 * KIB
GIB: Final = 1024 * MIB

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT  # x86 base page = QEMU TARGET_PAGE_SIZE on x86
