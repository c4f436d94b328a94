"""A helper process imports what it serves with, not the VMM: it starts while the
migration runs, on the CPUs the migration needs (livemig.lazy)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["livemig.migration.urgent", "livemig.migration.faultserver"])
def test_a_helper_module_does_not_import_the_vm(module: str) -> None:
    loaded = json.loads(subprocess.run(
        [sys.executable, "-c", f"import json, sys, {module}; "
                               "print(json.dumps(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True).stdout)
    assert module in loaded
    assert "livemig.vmm.vm" not in loaded  # the package re-exports Vm lazily


def test_the_package_still_exports_the_vm_and_the_stream_codec() -> None:
    import livemig
    import livemig.wire

    assert livemig.Vm.__name__ == "Vm"
    assert livemig.Backing.ANON_4K is not None
    assert livemig.wire.Decoder.__name__ == "Decoder"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = livemig.wire.Nope  # type: ignore[attr-defined]
