"""Booting guests: boot sectors with their test range patched in, or the os kernel."""

from __future__ import annotations

from livemig.guests import DEFAULT_RANGE_START, load_image, patch_range
from livemig.guests.os import OsParams, load_os_image
from livemig.vmm.multiboot import MultibootImage
from livemig.vmm.vm import Vm


def guest_range(vm: Vm) -> tuple[int, int]:
    """The guest-physical range the livemig guests work on: 1 MiB to the end of RAM."""
    return DEFAULT_RANGE_START, vm.main_block.size


def boot_image(vm: Vm, image: bytes, *, incoming: bool = False) -> None:
    """Load a boot sector as a BIOS would; livemig guests get their range patched in.
    ``incoming``: a migration destination, which keeps the image for a reset only."""
    start, end = guest_range(vm)
    vm.load_boot_sector(patch_range(image, start, end), incoming=incoming)


def boot_guest(vm: Vm, name: str) -> None:
    boot_image(vm, load_image(name))


def boot_os(vm: Vm, params: OsParams | None = None, *, incoming: bool = False) -> OsParams:
    """Load the os guest for this VM (default: all its vCPUs, regions filling its RAM).
    ``incoming``: a migration destination, which keeps the image for a reset only."""
    if params is None:
        params = OsParams.for_ram(vm.main_block.size, len(vm.vcpus))
    params.validate(vm.main_block.size)
    vm.load_multiboot(MultibootImage.parse(params.patch(load_os_image())), incoming=incoming)
    return params
