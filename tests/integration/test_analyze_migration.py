"""QEMU's own analyze-migration.py (7.2 and a current release) reads a saved livemig guest.

The guest is saved with ``migrate`` to ``file:``; the script (fetched at test time, see
qemu_scripts.py) must find the VM description, show every device section field by field
(``-d state``), print the description (``-d desc``), and extract RAM (``-x``) byte for
byte equal to the guest's, with 4 KiB and 2 MiB pages.  The same file still loads into
a livemig destination, and a stream saved with ``x-suppress-vmdesc`` has no description.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import (
    client,
    empty_instance,
    halt_instance,
    hugepages_given_back,
    qmp_path,
    same_ram,
    wait_migration,
)
from qemu_scripts import RELEASES, Unavailable, analyze_script

from livemig.instance import Instance
from livemig.kernel.mman import Backing

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module", params=sorted(RELEASES))
def script(request: pytest.FixtureRequest) -> Path:
    try:
        return analyze_script(request.param)
    except Unavailable as e:
        pytest.skip(f"QEMU {request.param}'s analyze-migration.py cannot be fetched: {e}")


def save(src: Instance, path: Path, **params: Any) -> None:
    with client(qmp_path(src)) as s:
        s.execute("stop")
        if params:
            s.execute("migrate-set-parameters", **params)
        s.execute("migrate", uri=f"file:{path}")
        assert wait_migration(s)["status"] == "completed"


def analyze(script: Path, image: Path, *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(script), "-f", str(image), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("backing", [pytest.param(Backing.ANON_4K, id="4K"),
                                     pytest.param(Backing.HUGETLB_2M, id="2M")])
def test_qemu_script_reads_a_saved_guest(script: Path, tmp_path: Path,
                                         backing: Backing) -> None:
    image = tmp_path / "guest.mig"
    out = tmp_path / "extract"
    out.mkdir()
    with hugepages_given_back(backing), halt_instance(tmp_path, backing=backing) as src:
        save(src, image)
        state = json.loads(analyze(script, image, "-d", "state", cwd=tmp_path))
        desc = json.loads(analyze(script, image, "-d", "desc", cwd=tmp_path))
        analyze(script, image, "-x", cwd=out)
        for name, block in src.vm.blocks.items():
            extracted = np.fromfile(out / name, dtype=np.uint8)
            assert np.array_equal(extracted, block.array()), name
        regs = src.vm.save_state().vcpus[0]
        serial = src.vm.save_state().serial
    assert desc["page_size"] == 4096
    names = [d["name"] for d in desc["devices"]]
    assert names == ["livemig/capabilities", "livemig/globalstate", "livemig/cpu",
                     "livemig/serial", "livemig/platform"]
    platform = state["livemig/platform (5)"]
    assert set(platform) >= {"clock_ns", "pic_master", "pic_slave", "ioapic", "pit"}
    cpu = state["livemig/cpu (1)"]
    rip = bytes.fromhex(cpu["regs"]["rip"].replace(" ", ""))
    assert rip == regs.regs[16 * 8:17 * 8]  # the 17th u64 of kvm_regs, memory order
    assert set(cpu["sregs"]["cs"]) >= {"base", "limit", "selector", "present"}
    assert len(cpu["msrs"]) == len(regs.msrs)
    ser = state["livemig/serial (2)"]
    assert [int(ser[r], 16) for r in ("ier", "lcr", "mcr", "scr", "dll", "dlm")] == [
        serial.ier, serial.lcr, serial.mcr, serial.scr, serial.dll, serial.dlm]
    assert bytes.fromhex(state["livemig/globalstate (3)"]["runstate"].replace(" ", "")) \
        == b"paused"
    assert "ram (0)" in state


def test_saved_image_with_description_loads_into_livemig(tmp_path: Path) -> None:
    image = tmp_path / "guest.mig"
    with halt_instance(tmp_path) as src, empty_instance(tmp_path) as dst:
        save(src, image)
        assert b'{"page_size":4096' in image.read_bytes()[-65536:]
        with client(qmp_path(dst)) as d:
            d.execute("migrate-incoming", uri=f"file:{image}")
            assert wait_migration(d)["status"] == "completed"
        assert same_ram(src.vm, dst.vm)


def test_suppress_vmdesc_saves_no_description(script: Path, tmp_path: Path) -> None:
    image = tmp_path / "guest.mig"
    with halt_instance(tmp_path) as src, empty_instance(tmp_path) as dst:
        save(src, image, **{"x-suppress-vmdesc": True})
        proc = subprocess.run([sys.executable, str(script), "-f", str(image), "-d", "desc"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert "No Debug Migration device found" in proc.stderr
        with client(qmp_path(dst)) as d:
            d.execute("migrate-incoming", uri=f"file:{image}")
            assert wait_migration(d)["status"] == "completed"
        assert same_ram(src.vm, dst.vm)
