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
import threading
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
from livemig.migration.helper import helper_name
from livemig.migration.source import device_sections
from livemig.migration.vmdesc import device_payloads
from livemig.units import PAGE_SIZE
from livemig.vmm.boot import boot_guest
from livemig.vmm.vm import Vm, VmConfig
from livemig.wire.blocks import host_page_summary
from livemig.wire.channel import ChannelKind
from livemig.wire.encoder import Encoder
from livemig.wire.events import NEED_DATA
from livemig.wire.returnpath import (
    RecvBitmap,
    ReqPages,
    ResumeAck,
    ReturnPathDecoder,
    RpEvent,
    Shut,
)

pytestmark = pytest.mark.kvm

SLOW = 16_000_000  # bytes/s in postcopy: the random guest's ~57 MiB left last ~3.5 s
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


def test_a_paused_multifd_postcopy_in_memfd_ram_recovers_and_completes(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Shared 4 KiB guest RAM, sent by the multifd channels, then mapped by the urgent
    helper (a new one after the recovery)."""
    test_a_paused_postcopy_recovers_and_completes(
        tmp_path, request, caps_of(postcopy=True, preempt=True, multifd=True), "process",
        Backing.MEMFD_4K)


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
    """Helper processes running ``module`` forked for this test process (by its helper
    servers): the kernel knows them by the module's name."""
    me, parents, names = os.getpid(), {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
        except OSError:
            continue  # gone meanwhile
        parents[int(entry)] = int(tail.split()[1])
        names[int(entry)] = head.split("(", 1)[1]
    return [pid for pid, name in names.items()
            if name == helper_name(module) and parents.get(parents.get(pid, 0)) == me]


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


def postcopy_stream_head(vm: Vm, runstate: str, handshake: Handshake
                         ) -> tuple[bytes, Encoder]:
    """What a test source sends up to postcopy: the capabilities, the return path,
    ADVISE, the ram section's start (no page), and the LISTEN/state/RUN package with
    ``vm``'s state (the guest runs there, or not, as ``runstate`` says); and the
    encoder, to go on with."""
    table = block_table(vm.blocks)
    enc = Encoder(postcopy=True)
    out: list[Any] = [enc.preamble()]
    out += enc.device_state(hs.CAPABILITIES.section_id, hs.CAPABILITIES.name,
                            handshake.encode())
    out += [enc.open_return_path(), enc.postcopy_advise(host_page_summary(table)),
            enc.ram_start(hs.RAM.section_id), enc.mem_size(table), enc.close_ram_section()]
    package = enc.package()
    blob = [package.postcopy_listen(),
            *device_sections(package, device_payloads(vm.save_state(), runstate)),
            package.postcopy_run()]
    out += enc.packaged(b"".join(bytes(b) for b in blob))
    return b"".join(bytes(b) for b in out), enc


def incoming_postcopy(dq: QmpClient, path: Path, *, preempt: bool = False) -> None:
    dq.execute("migrate-set-capabilities",
               capabilities=[{"capability": "postcopy-ram", "state": True},
                             {"capability": "postcopy-preempt", "state": preempt}])
    dq.execute("migrate-incoming", uri=f"unix:{path}")


def whole_postcopy_stream(*, skip_last: bool) -> bytes:
    """A test source's whole postcopy stream of a stopped guest: every page of its RAM
    after the package (all but the last one with ``skip_last``), then the end."""
    src_vm = Vm(VmConfig(MEM))
    try:
        boot_guest(src_vm, "ab")  # some non-zero pages worth sending
        ram = src_vm.main_block.view()
        pages = np.arange(MEM // PAGE_SIZE, dtype=np.uint64) * np.uint64(PAGE_SIZE)
        head, enc = postcopy_stream_head(src_vm, "paused", Handshake(postcopy_ram=True))
        out: list[Any] = [head, enc.ram_part(hs.RAM.section_id),
                          *enc.pages("pc.ram", pages[:-1] if skip_last else pages, ram),
                          enc.close_ram_section(), enc.ram_end(hs.RAM.section_id),
                          enc.close_ram_section(), enc.eof()]
        stream = b"".join(bytes(b) for b in out)
        out.clear()  # the page payloads are views of the VM's RAM
        ram.release()
        return stream
    finally:
        src_vm.close()


def test_a_postcopy_stream_that_skips_a_page_fails_the_destination_naming_it(
        tmp_path: Path) -> None:
    """Completeness: before it says completed, the destination checks that every host
    page arrived (or was legitimately zero).  A test source that sends every page but
    one, in postcopy, gets a typed failure naming the block and the page, never a
    silent zero page."""
    skipped = MEM - PAGE_SIZE
    stream = whole_postcopy_stream(skip_last=True)
    with guest_instance(tmp_path, None, "dst") as dst, client(dst) as dq:
        path = tmp_path / "in.sock"
        incoming_postcopy(dq, path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.connect(str(path))
            peer.sendall(stream)
            info = wait_migration(dq, 60)
        assert info["status"] == "failed", info
        assert f"1 host pages of pc.ram (first at {skipped:#x})" in info["error-desc"], info
        assert dq.execute("query-status")["status"] != "running"


def resume_answer(dq: QmpClient, path: Path) -> RpEvent:
    """migrate-recover on ``path``; a test source resumes there and asks for the
    bitmap of pc.ram: the destination's first answer."""
    dq.execute("migrate-recover", uri=f"unix:{path}")
    resumed = Encoder(postcopy=True, resumed=[hs.RAM.section_id])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
        peer.connect(str(path))
        peer.sendall(resumed.preamble() + resumed.recv_bitmap("pc.ram"))
        return ReturnPath(peer).next()


@pytest.mark.parametrize("source_gone", [False, True],
                         ids=["shut-lost-later", "source-gone-before-the-shut"])
def test_a_completed_postcopy_destination_answers_a_resume_with_shut(
        tmp_path: Path, source_gone: bool) -> None:
    """A source that lost the final SHUT resumes: the destination, completed, takes
    migrate-recover, answers the first RECV_BITMAP with SHUT 0 (not a bitmap), stays
    completed, and takes another migrate-recover afterwards.

    ``source_gone``: the source goes away right after the stream's last byte, so the
    SHUT the destination then sends fails; that must not fail the migration (the
    guest runs there, whole: failing would lose it)."""
    stream = whole_postcopy_stream(skip_last=False)
    with guest_instance(tmp_path, None, "dst") as dst, client(dst) as dq:
        incoming_postcopy(dq, tmp_path / "in.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as first:
            first.connect(str(tmp_path / "in.sock"))
            first.sendall(stream)
            if not source_gone:
                assert wait_migration(dq, 60)["status"] == "completed"
        info = wait_migration(dq, 60)
        assert info["status"] == "completed", info
        for i in range(2):
            path = tmp_path / f"recover{i}.sock"
            assert resume_answer(dq, path) == Shut(0)
            assert dq.execute("query-migrate")["status"] == "completed"
            deadline = time.monotonic() + 10
            while path.exists():  # the listener goes once the answer is done
                assert time.monotonic() < deadline, "migrate-recover's socket stayed"
                time.sleep(0.02)


def test_a_completed_precopy_destination_refuses_migrate_recover(tmp_path: Path) -> None:
    """Only a destination that ran a postcopy can have a source waiting for its SHUT."""
    with migration_pair(tmp_path, PairConfig(src_caps=caps_of(postcopy=True))) as p:
        p.listen()
        p.migrate()
        assert wait_migration(p.dq, 120)["status"] == "completed"
        with pytest.raises(QmpError, match="paused"):
            p.dq.execute("migrate-recover", uri=f"unix:{tmp_path / 'r.sock'}")


class ReturnPath:
    """A test source's end of the return path on ``sock``: the next event, waiting at
    most ``timeout`` seconds for it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = ReturnPathDecoder()

    def next(self, timeout: float = 10) -> RpEvent:
        self.sock.settimeout(timeout)
        while True:
            e = self.dec.next_event()
            if e is not NEED_DATA:
                return e
            try:
                self.dec.receive_data(self.sock.recv(65536))
            except TimeoutError:
                raise AssertionError(f"no return-path message within {timeout} s") from None


class SourceLink:
    """A test source's connections to a destination waiting at ``path``: the main
    channel, and with ``urgent_process`` a postcopy channel too, on which the
    destination's fault server then sends its page requests and gets the answers."""

    def __init__(self, path: Path, urgent_process: bool) -> None:
        self.main = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.main.connect(str(path))
        self.rp = ReturnPath(self.main)
        self.post: socket.socket | None = None
        self.post_enc = Encoder(channel=ChannelKind.POSTCOPY, postcopy=True)
        if urgent_process:
            self.post = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.post.connect(str(path))
            self.post.sendall(self.post_enc.preamble())
        self.requests = ReturnPath(self.post) if self.post is not None else self.rp

    def drain(self) -> list[threading.Thread]:
        """From now on read and drop what the destination sends until it closes, as a
        source's return-path reader does: a destination whose page requests nobody
        reads blocks on a full socket, and its SHUT waits behind them."""
        def read_until_closed(sock: socket.socket) -> None:
            while sock.recv(65536):
                pass

        threads = [threading.Thread(target=read_until_closed, args=(sock,), daemon=True)
                   for sock in (self.main, self.post) if sock is not None]
        for t in threads:
            t.start()
        return threads

    def close(self) -> None:
        for sock in (self.main, self.post):
            if sock is not None:
                sock.close()


@pytest.mark.parametrize("urgent_process", [False, True], ids=["vanilla", "preempt-process"])
def test_a_page_whose_request_was_lost_in_the_cut_is_asked_for_again_after_the_recovery(
        tmp_path: Path, urgent_process: bool) -> None:
    """Rerequest after resume (both fault handlers: threads, and the fault server with
    requests on the postcopy channel): the guest runs on the destination and its vCPU
    blocks on a page; the request reaches a test source, which never answers it and
    cuts the connection.  After the recovery nothing but the destination asking again can bring
    that page (the test source sends no page unasked): the request must come again on
    the new connection, and once it is answered the guest runs on and the migration
    completes with every page whole."""
    handshake = Handshake(postcopy_ram=True, postcopy_preempt=urgent_process,
                          urgent_process=urgent_process)
    src_vm = Vm(VmConfig(MEM))
    try:
        boot_guest(src_vm, "ab")
        src_vm.start()
        assert src_vm.serial.wait_for(2, timeout=60)
        src_vm.pause()
        head, _ = postcopy_stream_head(src_vm, "running", handshake)
        ram = src_vm.main_block.array().copy()
    finally:
        src_vm.close()
    enc = Encoder(postcopy=True, resumed=[hs.RAM.section_id])

    def on_main(offsets: list[int]) -> bytes:
        offs = np.array(offsets, dtype=np.uint64)
        return b"".join(bytes(b) for b in [enc.ram_part(hs.RAM.section_id),
                                            *enc.pages("pc.ram", offs, ram),
                                            enc.close_ram_section()])

    def answer(link: SourceLink, req: ReqPages) -> None:
        """The requested page, on the channel the request came on."""
        offsets = list(range(req.start, req.start + req.length, PAGE_SIZE))
        if link.post is None:
            link.main.sendall(on_main(offsets))
            return
        pages = link.post_enc.pages("pc.ram", np.array(offsets, dtype=np.uint64), ram)
        link.post.sendall(b"".join(bytes(b) for b in pages))

    with guest_instance(tmp_path, None, "dst") as dst, client(dst) as dq:
        incoming_postcopy(dq, tmp_path / "in.sock", preempt=urgent_process)
        first = SourceLink(tmp_path / "in.sock", urgent_process)
        try:
            first.main.sendall(head)
            lost = first.requests.next()
            assert isinstance(lost, ReqPages), lost  # the vCPU waits for it
        finally:
            first.close()
        wait_status(dq, "postcopy-paused")
        dq.execute("migrate-recover", uri=f"unix:{tmp_path / 'recover.sock'}")
        link = SourceLink(tmp_path / "recover.sock", urgent_process)
        try:
            link.main.sendall(enc.preamble() + enc.recv_bitmap("pc.ram"))
            here = link.rp.next()
            assert isinstance(here, RecvBitmap) and not here.received.any(), here
            link.main.sendall(enc.postcopy_resume())
            assert isinstance(link.rp.next(), ResumeAck)
            again = link.requests.next()
            assert again == lost, "the lost request was not sent again after the recovery"
            answer(link, lost)
            following = link.requests.next()
            assert isinstance(following, ReqPages) and following != lost, following
            readers = link.drain()
            if link.post is not None:
                link.post.sendall(link.post_enc.eof())
            rest = [o for o in range(0, MEM, PAGE_SIZE)
                    if not lost.start <= o < lost.start + lost.length]
            link.main.sendall(on_main(rest) + enc.ram_end(hs.RAM.section_id)
                              + enc.close_ram_section() + enc.eof())
            assert wait_migration(dq, 60)["status"] == "completed"
            for reader in readers:
                reader.join(10)
                assert not reader.is_alive(), "the destination kept its connection open"
        finally:
            link.close()
        assert runs_on(dst.vm), dst.vm.serial.output[-80:]
        check = guest_check(dq, "ab")
        assert check["bad_pages"] == 0, check
