"""livemig: live migration of KVM virtual machines in Python.

The public API is re-exported here (the VM and the memory backing on first use, see
livemig.lazy); see docs/ARCHITECTURE.md for the map of modules.
"""

from typing import TYPE_CHECKING

from livemig.errors import (
    ChannelClosedError,
    ConfigError,
    KernelError,
    LivemigError,
    MigrationError,
    QmpError,
    RemoteProtocolError,
    StreamError,
)
from livemig.lazy import lazy_exports

if TYPE_CHECKING:
    from livemig.kernel.mman import Backing
    from livemig.vmm.vm import RunState, Vm, VmConfig

__version__ = "0.1.0"

__all__ = [
    "Backing",
    "ChannelClosedError",
    "ConfigError",
    "KernelError",
    "LivemigError",
    "MigrationError",
    "QmpError",
    "RemoteProtocolError",
    "RunState",
    "StreamError",
    "Vm",
    "VmConfig",
]

__getattr__ = lazy_exports(__name__, {
    "Backing": "livemig.kernel.mman",
    "RunState": "livemig.vmm.vm",
    "Vm": "livemig.vmm.vm",
    "VmConfig": "livemig.vmm.vm",
})
