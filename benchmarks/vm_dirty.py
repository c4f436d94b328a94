"""Dirty tracking benchmark: the ab guest's dirty rate and the cost of a dirty-log sync.

    python benchmarks/vm_dirty.py [--mem 1G] [--page-size 4K] [--seconds 3]

Measures, on real KVM:
- the ab guest's dirty rate (pages/s), from dirty-log syncs over a few seconds after a
  warm-up pass (first touches of fresh memory are slow on nested KVM);
- the cost of one KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (+ NumPy OR) of the whole
  block, with every page dirty (worst case) and with none dirty.
"""

from __future__ import annotations

import statistics
import time

import click
from rich.console import Console
from rich.table import Table

from livemig.kernel.mman import Backing
from livemig.vmm.boot import boot_guest
from livemig.vmm.memory import new_bitmap
from livemig.vmm.vm import Vm, VmConfig, parse_size


@click.command()
@click.option("--mem", default="1G", show_default=True, help="Guest RAM size.")
@click.option("--page-size", default="4K", show_default=True,
              help="Backing: 4K, THP, 2M or 1G.")
@click.option("--seconds", default=3.0, show_default=True,
              help="How long the dirty rate is sampled.")
def main(mem: str, page_size: str, seconds: float) -> None:
    """The ab guest's dirty rate and the cost of one dirty-log sync of its RAM."""
    console = Console()
    with Vm(VmConfig(parse_size(mem), Backing.parse(page_size))) as vm:
        boot_guest(vm, "ab")
        vm.start()
        with console.status("warm-up: first touches of guest RAM"):
            vm.serial.wait_for(2, timeout=300)
        block = vm.main_block
        vm.set_dirty_logging(True)
        bitmap = new_bitmap(block.pages)
        block.sync_dirty(bitmap)
        passes0 = vm.serial.output.count(b"B")
        t0 = time.monotonic()
        dirtied = 0
        while time.monotonic() - t0 < seconds:
            time.sleep(0.1)
            bitmap[:] = 0
            dirtied += block.sync_dirty(bitmap)
        elapsed = time.monotonic() - t0
        passes = vm.serial.output.count(b"B") - passes0
        vm.pause()

        def sync_ms(fill: bool) -> float:
            times = []
            for _ in range(10):
                if fill:
                    block.array()[::4096] += 1  # dirty every page (a VMM write per page)
                    block.mark_dirty(0, block.size)
                t = time.perf_counter()
                block.sync_dirty(bitmap)
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)

        vm.set_dirty_logging(True)
        empty = sync_ms(False)
        # Re-enable guest writes for a realistic all-dirty log: run one full pass.
        vm.start()
        vm.serial.wait_for(1, timeout=120)
        vm.pause()
        t = time.perf_counter()
        block.sync_dirty(bitmap)
        full_kvm = (time.perf_counter() - t) * 1e3

    table = Table(title=f"vm_dirty: ab guest, {mem}, {page_size} pages")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("guest passes/s", f"{passes / elapsed:.1f}")
    table.add_row("dirty rate (pages/s, from the dirty log)", f"{dirtied / elapsed:,.0f}")
    table.add_row(f"sync+clear of {mem}, nothing dirty (ms)", f"{empty:.2f}")
    table.add_row(f"sync+clear of {mem}, every page dirty (ms)", f"{full_kvm:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
