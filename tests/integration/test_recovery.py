"""Postcopy recovery on real KVM: a postcopy that loses its connections pauses on both
sides, and ``migrate-recover`` + ``migrate resume=true`` finish it over new ones.

QEMU's own cases are the model (postcopy/recovery/plain, postcopy/preempt/recovery/
plain, recovery/double-failures/handshake and /reconnect); here each runs with every
urgent-sender design and with 4 KiB and 2 MiB pages, and the guest checks every page
of its RAM at the end: nothing received before the pause is lost, nothing sent twice
lands twice, no page arrives as a silent zero.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pc_helpers import (
    FINISHED,
    GUEST_PAGES,
    MEM,
    NO_CONVERGENCE,
    Pair,
    PairConfig,
    caps_of,
    client,
    ends_migration,
    events,
    guest_check,
    guest_instance,
    hugepages_checked,
    migration_pair,
    migration_statuses,
    runs_on,
    start_postcopy_after_first_round,
    wait_migration,
)

from livemig.control.client import QmpClient
from livemig.errors import QmpError
from livemig.kernel.mman import Backing
from livemig.migration import handshake as hs
from livemig.migration.handshake import Handshake, block_table
from livemig.migration.source import device_sections
from livemig.migration.vmdesc import device_payloads
from livemig.units import PAGE_SIZE
from livemig.vmm.boot import boot_guest
from livemig.vmm.vm import Vm, VmConfig
from livemig.wire.blocks import host_page_summary
from livemig.wire.encoder import Encoder

pytestmark = pytest.mark.kvm

SLOW = 4_000_000  # bytes/s in postcopy: the migration is still running when we cut it
DESIGNS = [
    pytest.param(caps_of(postcopy=True), "migration", id="vanilla"),
    pytest.param(caps_of(postcopy=True, preempt=True), "migration", id="preempt-migration"),
    pytest.param(caps_of(postcopy=True, preempt=True), "return-path", id="preempt-rp"),
    pytest.param(caps_of(postcopy=True, preempt=True), "process", id="preempt-process"),
    # Precopy on two multifd channels first (QEMU 7.2 refuses multifd with postcopy).
    pytest.param(caps_of(postcopy=True, preempt=True, multifd=True), "process",
                 id="preempt-process-multifd"),
]
BACKINGS = [pytest.param(Backing.ANON_4K, id="4K"), pytest.param(Backing.HUGETLB_2M, id="2M")]


def recovery_config(caps: tuple[tuple[str, bool], ...], sender: str,
                    backing: Backing) -> PairConfig:
    return PairConfig("random", backing, src_caps=caps,
                      params={**NO_CONVERGENCE, "x-postcopy-urgent-sender": sender,
                              "max-postcopy-bandwidth": SLOW})


def wait_status(qmp: QmpClient, status: str, timeout: float = 60) -> dict[str, Any]:
    info = wait_migration(qmp, timeout, until=(status, *FINISHED))
    assert info["status"] == status, info
    return info


def start_postcopy(p: Pair) -> None:
    p.listen()
    p.migrate()
    start_postcopy_after_first_round(p.sq)
    wait_status(p.sq, "postcopy-active")
    wait_status(p.dq, "postcopy-active")


def recover(p: Pair, tmp_path: Path, name: str) -> None:
    """migrate-recover on the destination, then migrate resume=true on the source."""
    uri = f"unix:{tmp_path / name}"
    p.dq.execute("migrate-recover", uri=uri)
    p.sq.execute("migrate", uri=uri, resume=True)


def finish(p: Pair) -> tuple[dict[str, Any], dict[str, Any]]:
    src, dst = wait_migration(p.sq, 120), wait_migration(p.dq, 120)
    assert (src["status"], dst["status"]) == ("completed", "completed"), (src, dst)
    assert runs_on(p.dst.vm), p.dst.vm.serial.output[-80:]
    check = guest_check(p.dq, "random")
    assert (check["bad_pages"], check["pages"]) == (0, GUEST_PAGES), check
    return src, dst


@pytest.mark.parametrize("backing", BACKINGS)
@pytest.mark.parametrize(("caps", "sender"), DESIGNS)
def test_a_paused_postcopy_recovers_and_completes(
        tmp_path: Path, request: pytest.FixtureRequest, caps: tuple[tuple[str, bool], ...],
        sender: str, backing: Backing) -> None:
    """QEMU's postcopy/recovery/plain: migrate-pause on the source; both sides pause;
    recover over a new socket; the guest's memory is whole at the end."""
    hugepages_checked(request, backing)
    with migration_pair(tmp_path, recovery_config(caps, sender, backing)) as p:
        start_postcopy(p)
        p.sq.execute("migrate-pause")
        paused = wait_status(p.sq, "postcopy-paused")
        assert "migrate-pause" in paused.get("error-desc", ""), paused
        wait_status(p.dq, "postcopy-paused")
        recover(p, tmp_path, "recover.sock")
        src, _ = finish(p)
        assert migration_statuses(events(p.sq, ends_migration)) == [
            "setup", "active", "postcopy-active", "postcopy-paused",
            "postcopy-recover-setup", "postcopy-recover", "postcopy-active", "completed"]
        assert migration_statuses(events(p.dq, ends_migration)) == [
            "setup", "active", "postcopy-active", "postcopy-paused", "postcopy-recover",
            "postcopy-active", "completed"]
        assert src["ram"]["transferred"] >= src["ram"]["postcopy-bytes"]


def test_a_destination_pause_recovers_too(tmp_path: Path) -> None:
    """migrate-pause on the destination side pauses both sides the same way."""
    caps = caps_of(postcopy=True, preempt=True)
    with migration_pair(tmp_path, recovery_config(caps, "process", Backing.ANON_4K)) as p:
        start_postcopy(p)
        p.dq.execute("migrate-pause")
        wait_status(p.dq, "postcopy-paused")
        wait_status(p.sq, "postcopy-paused")
        recover(p, tmp_path, "recover.sock")
        finish(p)


def test_a_failure_during_recovery_pauses_again_and_a_second_recovery_completes(
        tmp_path: Path) -> None:
    """QEMU's recovery/double-failures/reconnect: pause, recover, pause again during
    the resumed postcopy, recover again."""
    caps = caps_of(postcopy=True, preempt=True)
    with migration_pair(tmp_path, recovery_config(caps, "return-path",
                                                  Backing.ANON_4K)) as p:
        start_postcopy(p)
        for i in range(2):
            p.sq.execute("migrate-pause")
            wait_status(p.sq, "postcopy-paused")
            wait_status(p.dq, "postcopy-paused")
            recover(p, tmp_path, f"recover{i}.sock")
            wait_status(p.sq, "postcopy-active")
        finish(p)


def test_a_resume_to_nobody_pauses_again(tmp_path: Path) -> None:
    """QEMU's recovery/double-failures/handshake, source side: the resume connects to
    nothing, the source goes back to postcopy-paused, and a later recovery works."""
    caps = caps_of(postcopy=True)
    with migration_pair(tmp_path, recovery_config(caps, "migration", Backing.ANON_4K)) as p:
        start_postcopy(p)
        p.sq.execute("migrate-pause")
        wait_status(p.sq, "postcopy-paused")
        wait_status(p.dq, "postcopy-paused")
        p.sq.execute("migrate", uri=f"unix:{tmp_path / 'nobody.sock'}", resume=True)
        time.sleep(0.2)
        info = wait_status(p.sq, "postcopy-paused")
        assert "cannot connect" in info.get("error-desc", ""), info
        recover(p, tmp_path, "recover.sock")
        finish(p)


def test_recovery_commands_are_refused_outside_a_paused_postcopy(tmp_path: Path) -> None:
    with migration_pair(tmp_path, recovery_config(caps_of(postcopy=True), "migration",
                                                  Backing.ANON_4K)) as p:
        with pytest.raises(QmpError, match="paused"):
            p.sq.execute("migrate", uri=f"unix:{tmp_path / 'x.sock'}", resume=True)
        with pytest.raises(QmpError, match="postcopy"):
            p.sq.execute("migrate-pause")
        start_postcopy(p)
        with pytest.raises(QmpError, match="paused"):
            p.dq.execute("migrate-recover", uri=f"unix:{tmp_path / 'y.sock'}")
        with pytest.raises(QmpError, match="[Pp]ostcopy is active"):
            p.sq.execute("migrate_cancel")
        finish(p)


def helper_pids(module: str) -> list[int]:
    """Helper processes of this test process running ``python -m module``."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if ppid == me and module.encode() in args:
            out.append(int(entry))
    return out


@pytest.mark.parametrize("module", ["livemig.migration.urgent", "livemig.migration.faultserver"],
                         ids=["source-urgent-helper", "destination-fault-server"])
def test_a_killed_helper_pauses_the_migration_and_a_recovery_completes_it(
        tmp_path: Path, module: str) -> None:
    """A helper process is recoverable like a link: its death pauses both sides (the
    side that lost it names it in error-desc), and new helpers come with the new
    connections."""
    caps = caps_of(postcopy=True, preempt=True)
    with migration_pair(tmp_path, recovery_config(caps, "process", Backing.ANON_4K)) as p:
        start_postcopy(p)
        (pid,) = helper_pids(module)
        os.kill(pid, signal.SIGKILL)
        src = wait_status(p.sq, "postcopy-paused")
        dst = wait_status(p.dq, "postcopy-paused")
        lost = src if "urgent" in module else dst
        assert "helper" in lost.get("error-desc", "") or "server" in lost.get(
            "error-desc", ""), lost
        recover(p, tmp_path, "recover.sock")
        finish(p)
        assert pid not in helper_pids(module)


def test_a_connection_lost_during_the_recovery_handshake_pauses_again(tmp_path: Path) -> None:
    """QEMU's recovery/double-failures/handshake, destination side: a peer connects to
    migrate-recover's socket, asks for a bitmap and vanishes before POSTCOPY_RESUME;
    the destination pauses again, and a second recovery completes the migration."""
    with migration_pair(tmp_path, recovery_config(caps_of(postcopy=True), "migration",
                                                  Backing.ANON_4K)) as p:
        start_postcopy(p)
        p.sq.execute("migrate-pause")
        wait_status(p.sq, "postcopy-paused")
        wait_status(p.dq, "postcopy-paused")
        path = tmp_path / "first.sock"
        p.dq.execute("migrate-recover", uri=f"unix:{path}")
        enc = Encoder(postcopy=True, resumed=[0])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.connect(str(path))
            peer.sendall(enc.preamble() + enc.recv_bitmap("pc.ram"))
            wait_status(p.dq, "postcopy-recover")
            assert peer.recv(4096)  # the bitmap started to come back
        info = wait_status(p.dq, "postcopy-paused")
        assert info.get("error-desc"), info
        recover(p, tmp_path, "second.sock")
        finish(p)
        assert migration_statuses(events(p.dq, ends_migration)).count("postcopy-paused") == 2


def test_a_postcopy_stream_that_skips_a_page_fails_the_destination_naming_it(
        tmp_path: Path) -> None:
    """Completeness: before it says completed, the destination checks that every host
    page arrived (or was legitimately zero).  A test source that sends every page but
    one, in postcopy, gets a typed failure naming the block and the page, never a
    silent zero page."""
    src_vm = Vm(VmConfig(MEM))
    try:
        boot_guest(src_vm, "ab")  # some non-zero pages worth sending
        ram = src_vm.main_block.view()
        pages = np.arange(MEM // PAGE_SIZE, dtype=np.uint64) * np.uint64(PAGE_SIZE)
        skipped = int(pages[-1])
        table = block_table(src_vm.blocks)
        enc = Encoder(postcopy=True)
        out: list[Any] = [enc.preamble()]
        out += enc.device_state(hs.CAPABILITIES.section_id, hs.CAPABILITIES.name,
                                Handshake(postcopy_ram=True).encode())
        out += [enc.open_return_path(), enc.postcopy_advise(host_page_summary(table)),
                enc.ram_start(hs.RAM.section_id), enc.mem_size(table),
                enc.close_ram_section()]
        package = enc.package()
        blob = [package.postcopy_listen(),
                *device_sections(package, device_payloads(src_vm.save_state(), "paused")),
                package.postcopy_run()]
        out += enc.packaged(b"".join(bytes(b) for b in blob))
        out += [enc.ram_part(hs.RAM.section_id), *enc.pages("pc.ram", pages[:-1], ram),
                enc.close_ram_section(), enc.ram_end(hs.RAM.section_id),
                enc.close_ram_section(), enc.eof()]
        stream = b"".join(bytes(b) for b in out)
        out.clear()  # the page payloads are views of the VM's RAM
        ram.release()
    finally:
        src_vm.close()
    with guest_instance(tmp_path, None, "dst") as dst, client(dst) as dq:
        dq.execute("migrate-set-capabilities",
                   capabilities=[{"capability": "postcopy-ram", "state": True}])
        path = tmp_path / "in.sock"
        dq.execute("migrate-incoming", uri=f"unix:{path}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.connect(str(path))
            peer.sendall(stream)
            info = wait_migration(dq, 60)
        assert info["status"] == "failed", info
        assert f"1 host pages of pc.ram (first at {skipped:#x})" in info["error-desc"], info
        assert dq.execute("query-status")["status"] != "running"
