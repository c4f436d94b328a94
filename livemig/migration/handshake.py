"""What source and destination must agree on: section names and ids, the capabilities
both must share, the urgent-path option, the RAM block table.

Theory of operation
-------------------
Every fact here is read by both sides, so it has one definition here and nowhere else:

* **Sections.**  The stream carries the ``ram`` section (iterative) and livemig's
  device sections (``livemig/...``), each with a section id and an instance id as in
  QEMU.  :data:`RAM`, :data:`CAPABILITIES`, :data:`GLOBALSTATE`, :data:`SERIAL`,
  :data:`PLATFORM` and :func:`cpu_section` name them.
* **The capabilities section** (:class:`Handshake`) opens the stream, before anything
  that can fault is loaded: ``postcopy-ram`` and ``postcopy-preempt`` must be equal on
  both sides (QEMU 7.2 trusts the user; a mismatch there loses the pages sent on a
  connection nobody reads), and options after a ``;`` tell the destination how the
  source serves page requests (``urgent=process``: requests go on the postcopy channel,
  where the source's urgent helper reads them).  ``multifd`` must be equal on both
  sides too; the source says how many multifd channels it opens and the UUID their
  initial packets carry (``multifd-channels=N``, ``multifd-uuid=HEX``).  Its text form
  is in docs/STREAM.md.
* **The block table** (:func:`block_table`): name, length and host page size of each
  RAM block, sent in the ``ram`` section's MEM_SIZE record and checked by the decoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from livemig.errors import MigrationError, RemoteProtocolError
from livemig.migration.state import Capabilities
from livemig.wire.blocks import BlockInfo
from livemig.wire.constants import MULTIFD_MAX_CHANNELS, RAM_VERSION_ID


class Section(NamedTuple):
    """A section of the stream: its idstr, section id and format version (instance 0
    unless said); the destination refuses any other version."""

    name: str
    section_id: int
    version: int = 1


RAM = Section("ram", 0, RAM_VERSION_ID)
SERIAL = Section("livemig/serial", 2)
GLOBALSTATE = Section("livemig/globalstate", 3)
CAPABILITIES = Section("livemig/capabilities", 4)
PLATFORM = Section("livemig/platform", 5)  # PIC, IOAPIC, PIT, kvmclock (with an irqchip)
CPU_NAME = "livemig/cpu"
_CPU_FIRST_ID, _CPU_ID_STRIDE = 1, 16


def cpu_section(index: int) -> Section:
    """The section of vCPU ``index`` (instance id ``index``)."""
    return Section(CPU_NAME, _CPU_FIRST_ID + _CPU_ID_STRIDE * index)


def device_section(idstr: str, instance_id: int, vcpus: int) -> Section | None:
    """The device section ``idstr`` instance ``instance_id`` of a VM with ``vcpus`` vCPUs,
    or None if there is no such section."""
    if idstr == CPU_NAME:
        return cpu_section(instance_id) if 0 <= instance_id < vcpus else None
    single = {s.name: s for s in (SERIAL, GLOBALSTATE, CAPABILITIES, PLATFORM)}.get(idstr)
    return single if instance_id == 0 else None


# In the capabilities section, after the capabilities: the destination's fault handler
# must send its page requests on the postcopy channel (urgent.py reads them there).
URGENT_PROCESS_OPTION = "urgent=process"
# ... and: the VM description follows the main channel's EOF (when the stream ends in
# precopy; QEMU's suppress-vmdesc turns it off).
VMDESC_OPTION = "vmdesc"
# ... and with multifd: how many channels, and the UUID their initial packets carry.
MULTIFD_CHANNELS_OPTION = "multifd-channels"
MULTIFD_UUID_OPTION = "multifd-uuid"
_AGREED = ("postcopy-ram", "postcopy-preempt", "multifd")


@dataclass(frozen=True)
class Handshake:
    """The content of the capabilities section."""

    postcopy_ram: bool = False
    postcopy_preempt: bool = False
    urgent_process: bool = False  # requests travel on the postcopy channel
    vmdesc: bool = False  # a precopy end brings the VM description after EOF
    multifd: bool = False
    multifd_channels: int = 0  # with multifd: the channels the source opens
    multifd_uuid: bytes = b""  # with multifd: 16 bytes, in every initial packet

    @classmethod
    def of(cls, caps: Capabilities, *, urgent_process: bool = False) -> Handshake:
        return cls(caps.postcopy_ram, caps.postcopy_preempt, urgent_process,
                   multifd=caps.multifd)

    def options(self) -> list[str]:
        out = [name for name, on in ((URGENT_PROCESS_OPTION, self.urgent_process),
                                     (VMDESC_OPTION, self.vmdesc)) if on]
        if self.multifd:
            out += [f"{MULTIFD_CHANNELS_OPTION}={self.multifd_channels}",
                    f"{MULTIFD_UUID_OPTION}={self.multifd_uuid.hex()}"]
        return out

    def agreed(self) -> str:
        """The capabilities both sides must have (or both lack), comma-separated."""
        on = (self.postcopy_ram, self.postcopy_preempt, self.multifd)
        return ",".join(name for name, yes in zip(_AGREED, on, strict=True) if yes)

    def encode(self) -> bytes:
        text = self.agreed()
        if self.options():
            text += ";" + ",".join(self.options())
        return text.encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> Handshake:
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise RemoteProtocolError("the capabilities section is not ASCII") from None
        agreed, _, options = text.partition(";")
        names = set(filter(None, agreed.split(",")))
        unknown = names - set(_AGREED)
        if unknown:
            raise RemoteProtocolError(f"unknown capabilities {sorted(unknown)} in the "
                                      "capabilities section")
        opts = set(filter(None, options.split(",")))
        keyed = {o for o in opts if o.startswith("multifd-")}
        values = dict(o.partition("=")[::2] for o in keyed)
        flags = opts - keyed
        if (flags - {URGENT_PROCESS_OPTION, VMDESC_OPTION}
                or set(values) - {MULTIFD_CHANNELS_OPTION, MULTIFD_UUID_OPTION}):
            raise RemoteProtocolError(f"unknown options {sorted(opts)} in the capabilities "
                                      "section")
        multifd = "multifd" in names
        channels, uuid = _multifd_options(values) if multifd else (0, b"")
        return cls("postcopy-ram" in names, "postcopy-preempt" in names,
                   URGENT_PROCESS_OPTION in flags, VMDESC_OPTION in flags,
                   multifd, channels, uuid)

    def check_matches(self, ours: Capabilities) -> None:
        """Refuse a source whose agreed capabilities differ from this destination's."""
        mine = Handshake.of(ours).agreed()
        if self.agreed() != mine:
            raise MigrationError(f"capability mismatch: the source has [{self.agreed()}], "
                                 f"this destination has [{mine}]; set the same on both sides")


def _multifd_options(values: Mapping[str, str]) -> tuple[int, bytes]:
    """The multifd channel count (1..255) and the 16-byte UUID, or RemoteProtocolError."""
    count, uuid = values.get(MULTIFD_CHANNELS_OPTION, ""), values.get(MULTIFD_UUID_OPTION, "")
    try:
        channels, raw = int(count), bytes.fromhex(uuid)
    except ValueError:
        channels, raw = 0, b""
    if not 1 <= channels <= MULTIFD_MAX_CHANNELS or len(raw) != 16:
        raise RemoteProtocolError(f"the capabilities section has multifd with channels "
                                  f"{count!r} and uuid {uuid!r}: expected 1 to "
                                  f"{MULTIFD_MAX_CHANNELS} channels and 16 bytes of hex")
    return channels, raw


class SizedBlock(Protocol):
    """What the block table needs of a RAM block."""

    @property
    def size(self) -> int: ...
    @property
    def host_page_size(self) -> int: ...


def block_table(blocks: Mapping[str, SizedBlock]) -> dict[str, BlockInfo]:
    """Name -> (length, host page size) of each RAM block, as MEM_SIZE carries it."""
    return {name: BlockInfo(b.size, b.host_page_size) for name, b in blocks.items()}
