"""livemig: live migration of KVM virtual machines in Python.

The public API is re-exported here; see docs/ARCHITECTURE.md for the map of modules.
"""

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
