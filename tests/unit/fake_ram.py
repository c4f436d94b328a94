"""A RAM block over a plain NumPy buffer: what the multifd senders, receivers and the
RAM loader need of a block, without KVM."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from livemig.units import PAGE_SIZE


class FakeBlock:
    """``pages`` 4 KiB pages of zeroes in a plain buffer."""

    def __init__(self, pages: int) -> None:
        self._mem = np.zeros(pages * PAGE_SIZE, dtype=np.uint8)
        self.size = pages * PAGE_SIZE
        self.host_page_size = PAGE_SIZE

    def view(self) -> memoryview:
        return memoryview(self._mem.data)

    def array(self) -> npt.NDArray[np.uint8]:
        return self._mem

    def pages(self) -> npt.NDArray[np.uint8]:
        """One row per 4 KiB page."""
        return self._mem.reshape(-1, PAGE_SIZE)
