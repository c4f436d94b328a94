"""One exception tree for all of livemig.

Every error raised on purpose by livemig derives from :class:`LivemigError`, so a
caller can catch them all; the branches say *who* is at fault::

    LivemigError
     +-- KernelError            a kernel call failed (carries errno and the operation)
     |    +-- KvmError          a KVM ioctl
     |    +-- UffdError         a userfaultfd call
     |    +-- MemoryMapError    mmap / memfd / madvise / hugetlb reservation
     +-- ConfigError            bad user input: sizes, page sizes, guest names, URIs
     +-- VmStateError           an operation not allowed in the VM's current state
     +-- StreamError            a migration stream problem
     |    +-- RemoteProtocolError   the peer sent something invalid (corrupt, truncated,
     |    |    |                    unknown section/block, out-of-range page, ...)
     |    |    +-- MissingPagesError  a stream ended without every page of RAM
     |    |    +-- CpuStateError      a saved vCPU field is out of its range
     |    +-- LocalProtocolError    we tried to send something the protocol forbids
     |    +-- ChannelClosedError    the peer vanished (EOF / reset) mid-stream
     |    +-- TlsError              a TLS handshake or peer check refused a connection
     +-- MigrationError         the migration state machine failed or was refused
     |    +-- MigrationCancelled
     +-- QmpError               a QMP command failed (class + desc, as QEMU reports it)
     +-- NetlabError            the test network lab could not build or change a link

Errors are values worth reading: their message is a complete sentence suitable for
a one-line CLI error or a QMP ``desc``.
"""

from __future__ import annotations

import errno as _errno
import os


class LivemigError(Exception):
    """Base of every error livemig raises on purpose."""


class KernelError(LivemigError):
    """A kernel call failed; ``errno`` and ``op`` say which and why."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        self.op = op
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        msg = f"{op} failed: {name} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class KvmError(KernelError):
    """A KVM ioctl failed."""


class UffdError(KernelError):
    """A userfaultfd call failed."""


class MemoryMapError(KernelError):
    """Mapping or reserving guest memory failed."""


class ConfigError(LivemigError):
    """The user asked for something invalid (sizes, page sizes, guests, URIs)."""


class VmStateError(LivemigError):
    """The operation is not allowed in the VM's current state."""


class StreamError(LivemigError):
    """A migration stream could not be encoded or decoded."""


class RemoteProtocolError(StreamError):
    """The peer sent bytes that break the stream protocol."""


class MissingPagesError(RemoteProtocolError):
    """A stream ended without some pages of guest RAM: ``block`` and ``first`` (a byte
    offset) name the first page that never arrived, ``count`` how many did not."""

    def __init__(self, block: str, first: int, count: int) -> None:
        self.block, self.first, self.count = block, first, count
        super().__init__(f"the stream ended without {count} pages of RAM block {block!r} "
                         f"(the first at offset {first:#x})")


class CpuStateError(RemoteProtocolError):
    """A saved vCPU state holds a value outside its field's range: ``field`` names it
    (``sregs.cr0``, ``events.exception.nr``, ``msr 0xc0000082``, ...)."""

    def __init__(self, field: str, why: str) -> None:
        self.field = field
        super().__init__(f"cpu state field {field} {why}")


class LocalProtocolError(StreamError):
    """We tried to send something the protocol does not allow (a bug on our side)."""


class ChannelClosedError(StreamError):
    """The peer closed the channel or vanished in the middle of the stream."""


class TlsError(StreamError):
    """A connection was refused by TLS: no or a bad certificate, a wrong CA, a wrong
    host name, an expired certificate, an identity tls-authz does not allow, or a peer
    that does not speak TLS (or speaks it to a listener without tls-creds)."""


class MigrationError(LivemigError):
    """The migration failed or was refused."""


class MigrationCancelled(MigrationError):
    """The migration was cancelled by the user."""


class QmpError(LivemigError):
    """A QMP command failed; ``error_class`` is QEMU's error class name."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        self.error_class = error_class
        self.desc = desc
        super().__init__(desc)


class NetlabError(LivemigError):
    """The network lab (test and benchmark tooling) could not build or change a link."""
