"""Record fuzzing seeds from real migrations (needs /dev/kvm and /dev/userfaultfd).

    python fuzz/record_seeds.py [--out fuzz/seeds] [--max-seed 65536]

Theory of operation
-------------------
Three real migrations of a small (2 MiB) VM run in this process, between livemig
instances driven over QMP as a user drives them:

1. a precopy save to ``file:`` of a halting guest with a few pages of data: the main
   stream with its VM description (``stream``), and its device sections, capabilities
   section and description as ``devstate`` inputs;
2. a postcopy-with-preemption migration of the ``ab`` guest through a recording TCP
   proxy, switched to postcopy at once: the main channel with ADVISE, DISCARD and the
   packaged device state (``stream``), its return path with PONG, page requests and SHUT
   (``returnpath``), the postcopy channel (``postcopy``) and, since the urgent sender is
   a helper process, the requests on that channel (``returnpath``) and the helpers'
   control messages (``helper``).  The QMP bytes both clients sent are ``qmp`` seeds;
3. the same migration, slowed down, paused (``migrate-pause``) and recovered through a
   second proxy: the resumed main channel with MIG_CMD_RECV_BITMAP and
   MIG_CMD_POSTCOPY_RESUME and its return path with the RECV_BITMAP answers and
   RESUME_ACK (``recovery``, the return path also as ``returnpath``), the new postcopy
   channel (``postcopy``);
4. a multifd precopy (two channels) of a guest with data and zero pages through a
   recording proxy: each multifd connection (``multifd``).

``--only TARGET`` (repeatable) writes only those targets' seeds and leaves the others'
as they are.

Each seed starts with the options byte its target reads first (fuzz/targets.py) and is
cut to ``--max-seed`` bytes: the fuzzer mutates from there, and the corpus stays small
enough to commit.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from livemig.control import protocol
from livemig.control.client import QmpClient
from livemig.guests import load_image
from livemig.instance import Instance
from livemig.kernel.mman import Backing
from livemig.migration import helper
from livemig.migration.channel import IMAGE_TRAILER
from livemig.tcpproxy import TcpProxy
from livemig.vmm.boot import boot_image
from livemig.vmm.vm import Vm, VmConfig
from livemig.wire import events as ev
from livemig.wire.blocks import BlockInfo
from livemig.wire.constants import MULTIFD_MAGIC_BYTES
from livemig.wire.decoder import Decoder

MEM = 2 << 20
HALT = bytes([0xFA, 0xF4, 0xEB, 0xFD]) + bytes(506) + b"\x55\xaa"  # cli; hlt; jmp $-2
# Options bytes (fuzz/targets.py): the seed block table and 4 KiB chunks.
STREAM_OPTS, POSTCOPY_OPTS, RP_OPTS, QMP_OPTS = 0x03, 0x03, 0x07, 0x01
RECOVERY_MAIN_OPTS, RECOVERY_RP_OPTS = 0x03, 0x80 | RP_OPTS
MULTIFD_OPTS = 0x00  # the seed block table, starting at the initial packet
RECOVERY_SEED = 16384  # the handshake and a few pages of RAM (fuzz/run.py's MAX_LEN)
DEVSTATE = {"livemig/cpu": 0, "livemig/serial": 1, "livemig/capabilities": 2}


class Recorder:
    """Seeds by target, taken from real traffic."""

    def __init__(self) -> None:
        self.seeds: dict[str, list[bytes]] = defaultdict(list)

    def add(self, target: str, data: bytes) -> None:
        if data:
            self.seeds[target].append(data)

    def write(self, out: Path, max_seed: int) -> int:
        total = 0
        for target, seeds in self.seeds.items():
            folder = out / target
            folder.mkdir(parents=True, exist_ok=True)
            for i, seed in enumerate(dict.fromkeys(s[:max_seed] for s in seeds)):
                (folder / f"real-{i:03d}").write_bytes(seed)
                total += len(seed)
        return total


@contextlib.contextmanager
def instance(tmp: Path, name: str) -> Iterator[Instance]:
    inst = Instance(Vm(VmConfig(MEM, Backing.ANON_4K)), str(tmp / f"{name}.qmp"))
    try:
        yield inst
    finally:
        inst.close()


def wait(c: QmpClient, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info: dict[str, Any] = c.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(0.05)
    raise TimeoutError("migration did not finish")


def boot_halting_with_data(vm: Vm, seed: int) -> None:
    """Start a halting guest whose RAM holds a few pages of random data (every 37th page
    from the 256th), the rest zero pages."""
    boot_image(vm, HALT)
    ram = vm.main_block.array().reshape(-1, 4096)
    ram[256::37] = np.random.default_rng(seed).integers(0, 256, ram[256::37].shape,
                                                        dtype=np.uint8)
    del ram
    vm.start()


def record_precopy_file(tmp: Path, rec: Recorder) -> None:
    image = tmp / "saved.mig"
    with instance(tmp, "src") as src:
        boot_halting_with_data(src.vm, seed=1)
        with QmpClient(str(tmp / "src.qmp")) as c:
            c.execute("stop")
            c.execute("migrate", uri=f"file:{image}")
            assert wait(c)["status"] == "completed"
    stream = image.read_bytes()[:-IMAGE_TRAILER]
    rec.add("stream", bytes([STREAM_OPTS]) + stream)
    dec = Decoder({"pc.ram": BlockInfo(MEM)})
    dec.receive_data(stream)
    dec.receive_eof()
    while not isinstance(e := dec.next_event(), ev.Closed):
        if isinstance(e, ev.DeviceState) and e.idstr in DEVSTATE:
            rec.add("devstate", bytes([DEVSTATE[e.idstr]]) + e.data)
        elif isinstance(e, ev.VmDescriptionEvent):
            rec.add("devstate", bytes([3]) + e.description.encode())


@contextlib.contextmanager
def tapped(rec: Recorder) -> Iterator[None]:
    """Record the helpers' control messages and the QMP bytes clients send."""
    send, decode, handle = helper._send, helper.decode_message, protocol.QmpProtocol.handle

    def rec_send(sock: socket.socket, msg: dict[str, Any], fds: Any) -> None:
        import json
        rec.add("helper", json.dumps(msg).encode())
        send(sock, msg, fds)

    def rec_decode(data: bytes) -> dict[str, Any]:
        rec.add("helper", bytes(data))
        return decode(data)

    def rec_handle(self: protocol.QmpProtocol, data: bytes) -> Iterator[bytes]:
        rec.add("qmp", bytes([QMP_OPTS]) + data)
        return handle(self, data)

    helper._send, helper.decode_message = rec_send, rec_decode
    protocol.QmpProtocol.handle = rec_handle  # type: ignore[method-assign]
    try:
        yield
    finally:
        helper._send, helper.decode_message = send, decode
        protocol.QmpProtocol.handle = handle  # type: ignore[method-assign]


def record_postcopy(tmp: Path, rec: Recorder) -> None:
    caps = [{"capability": c, "state": True} for c in ("postcopy-ram", "postcopy-preempt")]
    with free_port() as port, instance(tmp, "psrc") as src, instance(tmp, "pdst"):
        boot_image(src.vm, load_image("ab"))
        src.vm.start()
        proxy = TcpProxy(port)
        with QmpClient(str(tmp / "psrc.qmp")) as s, QmpClient(str(tmp / "pdst.qmp")) as d:
            for c in (s, d):
                c.execute("migrate-set-capabilities", capabilities=caps)
            # A slow first round: most pages are still on the source at the switch, so
            # the guest faults and the destination requests pages.
            s.execute("migrate-set-parameters", **{"max-bandwidth": 256 << 10})
            d.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            s.execute("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
            s.execute("migrate-start-postcopy")
            assert wait(s)["status"] == "completed"
            assert wait(d)["status"] == "completed"
        proxy.close()
    for up, down in proxy.flows:
        if up[:4] == b"QEVM":
            rec.add("stream", bytes([STREAM_OPTS]) + bytes(up))
            rec.add("returnpath", bytes([RP_OPTS]) + bytes(down))
        elif up[:4] == b"LMPC":
            rec.add("postcopy", bytes([POSTCOPY_OPTS]) + bytes(up))
            rec.add("returnpath", bytes([RP_OPTS]) + bytes(down))


def wait_for(c: QmpClient, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (now := c.execute("query-migrate").get("status")) != status:
        if time.monotonic() > deadline or now in ("completed", "failed", "cancelled"):
            raise TimeoutError(f"migration is {now}, not {status}")
        time.sleep(0.05)


def record_recovery(tmp: Path, rec: Recorder) -> None:
    """A slow postcopy paused at once and recovered over a second proxy: the recovered
    main channel (RECV_BITMAP, POSTCOPY_RESUME, the rest of RAM), its return path
    (RECV_BITMAP answers, RESUME_ACK) and the new postcopy channel."""
    caps = [{"capability": c, "state": True} for c in ("postcopy-ram", "postcopy-preempt")]
    with free_port() as port, free_port() as again, instance(tmp, "rsrc") as src, \
            instance(tmp, "rdst"):
        boot_image(src.vm, load_image("ab"))
        src.vm.start()
        first, second = TcpProxy(port), TcpProxy(again)
        with QmpClient(str(tmp / "rsrc.qmp")) as s, QmpClient(str(tmp / "rdst.qmp")) as d:
            for c in (s, d):
                c.execute("migrate-set-capabilities", capabilities=caps)
            s.execute("migrate-set-parameters", **{"max-bandwidth": 256 << 10,
                                                   "max-postcopy-bandwidth": 256 << 10})
            d.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            s.execute("migrate", uri=f"tcp:127.0.0.1:{first.port}")
            s.execute("migrate-start-postcopy")
            wait_for(s, "postcopy-active")
            s.execute("migrate-pause")
            wait_for(s, "postcopy-paused")
            wait_for(d, "postcopy-paused")
            d.execute("migrate-recover", uri=f"tcp:127.0.0.1:{again}")
            s.execute("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
            s.execute("migrate", uri=f"tcp:127.0.0.1:{second.port}", resume=True)
            assert wait(s)["status"] == "completed"
            assert wait(d)["status"] == "completed"
        first.close()
        second.close()
    for up, down in second.flows:
        if up[:4] == b"LMPC":
            rec.add("postcopy", bytes([POSTCOPY_OPTS]) + bytes(up))
        else:
            rec.add("recovery", bytes([RECOVERY_MAIN_OPTS]) + bytes(up[:RECOVERY_SEED]))
        rec.add("recovery", bytes([RECOVERY_RP_OPTS]) + bytes(down))
        rec.add("returnpath", bytes([RP_OPTS]) + bytes(down))


def record_multifd(tmp: Path, rec: Recorder) -> None:
    """A multifd precopy over two channels through a recording proxy: each multifd
    connection's initial packet, page packets (data and zero pages) and SYNCs."""
    caps = [{"capability": "multifd", "state": True}]
    with free_port() as port, instance(tmp, "msrc") as src, instance(tmp, "mdst"):
        boot_halting_with_data(src.vm, seed=2)
        proxy = TcpProxy(port)
        with QmpClient(str(tmp / "msrc.qmp")) as s, QmpClient(str(tmp / "mdst.qmp")) as d:
            for c in (s, d):
                c.execute("migrate-set-capabilities", capabilities=caps)
                c.execute("migrate-set-parameters", **{"multifd-channels": 2})
            d.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            s.execute("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
            assert wait(s)["status"] == "completed"
            assert wait(d)["status"] == "completed"
        proxy.close()
    for up, _down in proxy.flows:
        if up[:4] == MULTIFD_MAGIC_BYTES:
            rec.add("multifd", bytes([MULTIFD_OPTS]) + bytes(up))


RECORDINGS = {"stream": (record_precopy_file, record_postcopy),
              "devstate": (record_precopy_file,),
              "postcopy": (record_postcopy, record_recovery),
              "returnpath": (record_postcopy, record_recovery),
              "helper": (record_postcopy,), "qmp": (record_postcopy,),
              "recovery": (record_recovery,), "multifd": (record_multifd,)}


@contextlib.contextmanager
def free_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path(__file__).parent / "seeds", show_default=True)
@click.option("--max-seed", default=65536, show_default=True, help="Cut seeds to this size.")
@click.option("--only", multiple=True, type=click.Choice(sorted(RECORDINGS)),
              help="Record and write only these targets' seeds.")
def main(out: Path, max_seed: int, only: tuple[str, ...]) -> None:
    """Record seeds for every fuzz target from real migrations."""
    rec = Recorder()
    targets = only or tuple(RECORDINGS)
    recordings = dict.fromkeys(r for t in targets for r in RECORDINGS[t])
    with tempfile.TemporaryDirectory() as tmp, tapped(rec):
        for record in recordings:
            record(Path(tmp), rec)
    for target in set(rec.seeds) - set(targets):
        del rec.seeds[target]
    total = rec.write(out, max_seed)
    for target, seeds in sorted(rec.seeds.items()):
        click.echo(f"{target:11} {len(seeds):4} seeds")
    click.echo(f"{total} bytes in {out}")


if __name__ == "__main__":
    main()
