"""Multifd precopy on real KVM: pages on several connections, each sent by a thread
of the source straight from guest RAM, received by threads straight into guest RAM.

The ab guest dirties its memory all the time; after a multifd migration with 1, 2 or
4 channels it must go on passing on the destination and the host-side check must find
no bad page.  A paused guest arrives byte for byte.  Multifd precopy followed by
postcopy with preemption (QEMU 7.2 refuses the combination) finishes with every page.
Bad ``multifd-channels`` values are refused with QEMU's typed error, a multifd
migration to a file: URI is refused, and a channel whose connection is killed fails
the precopy while the source guest keeps running.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    EVENTS_ON,
    FAST_CONVERGENCE,
    MEM,
    ab_instance,
    client,
    empty_instance,
    free_tcp_port,
    guest_check,
    halt_instance,
    hugepages_given_back,
    nonzero_bytes,
    qmp_path,
    same_ram,
    status,
    wait_migration,
)

from livemig.control.client import QmpClient
from livemig.errors import QmpError
from livemig.guests import DEFAULT_RANGE_START
from livemig.kernel.mman import Backing
from livemig.netlab import run_command
from livemig.units import MIB

pytestmark = pytest.mark.kvm

GUEST_PAGES = (MEM - DEFAULT_RANGE_START) // 4096


def multifd_caps(on: bool = True, *extra: str) -> list[dict[str, Any]]:
    return [*EVENTS_ON, {"capability": "multifd", "state": on},
            *({"capability": c, "state": True} for c in extra)]


def tcp_uri() -> str:
    return f"tcp:127.0.0.1:{free_tcp_port()}"


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_running_guest_migrates_over_multifd_channels_and_keeps_passing(
        tmp_path: Path, channels: int) -> None:
    uri = tcp_uri()
    with ab_instance(tmp_path) as src, empty_instance(tmp_path) as dst, \
            client(qmp_path(src)) as s, client(qmp_path(dst)) as d:
        for c in (s, d):
            c.execute("migrate-set-capabilities", capabilities=multifd_caps())
        s.execute("migrate-set-parameters", **FAST_CONVERGENCE, **{
            "multifd-channels": channels})
        d.execute("migrate-incoming", uri=uri)
        s.execute("migrate", uri=uri)
        src_info, dst_info = wait_migration(s), wait_migration(d)
        assert src_info["status"] == "completed", src_info
        assert dst_info["status"] == "completed", dst_info
        multifd = src_info["x-multifd"]
        assert multifd["channels"] == channels
        assert len(multifd["bytes"]) == channels and all(b > 0 for b in multifd["bytes"])
        # The pages went on the multifd channels: the main channel carried far less
        # than the guest's RAM.
        ram = src_info["ram"]
        assert ram["normal"] >= GUEST_PAGES // 2, ram
        assert dst_info["ram"]["transferred"] >= ram["normal"] * 4096
        assert status(d) == "running"
        assert dst.vm.serial.wait_for(3, timeout=60), dst.vm.serial.output
        assert b"E" not in dst.vm.serial.output
        check = guest_check(d)
        assert check["bad_pages"] == 0, check
        assert check["pages"] == GUEST_PAGES


@pytest.mark.parametrize("backing", [pytest.param(Backing.ANON_4K, id="4K"),
                                     pytest.param(Backing.MEMFD_4K, id="4K-memfd"),
                                     pytest.param(Backing.HUGETLB_2M, id="2M")])
def test_paused_vm_arrives_byte_identical_over_multifd(tmp_path: Path,
                                                       backing: Backing) -> None:
    uri = tcp_uri()
    with hugepages_given_back(backing), halt_instance(tmp_path, backing=backing) as src, \
            empty_instance(tmp_path, backing=backing) as dst, \
            client(qmp_path(src)) as s, client(qmp_path(dst)) as d:
        s.execute("stop")
        for c in (s, d):
            c.execute("migrate-set-capabilities", capabilities=multifd_caps())
        s.execute("migrate-set-parameters", **{"multifd-channels": 3})
        d.execute("migrate-incoming", uri=uri)
        s.execute("migrate", uri=uri)
        src_info, dst_info = wait_migration(s), wait_migration(d)
        assert (src_info["status"], dst_info["status"]) == ("completed", "completed")
        assert nonzero_bytes(src.vm) > MEM // 4
        assert same_ram(src.vm, dst.vm)


def start_slow_multifd(s: QmpClient, d: QmpClient, uri: str) -> dict[str, Any]:
    """A multifd migration on 2 channels at 4 MiB/s, once it is active."""
    for c in (s, d):
        c.execute("migrate-set-capabilities", capabilities=multifd_caps())
    s.execute("migrate-set-parameters", **{"multifd-channels": 2, "max-bandwidth": 4 * MIB})
    d.execute("migrate-incoming", uri=uri)
    s.execute("migrate", uri=uri)
    return wait_migration(s, until=("active",))


def test_multifd_precopy_then_postcopy_with_preempt_finishes(tmp_path: Path) -> None:
    uri = tcp_uri()
    with ab_instance(tmp_path) as src, empty_instance(tmp_path) as dst, \
            client(qmp_path(src)) as s, client(qmp_path(dst)) as d:
        caps = multifd_caps(True, "postcopy-ram", "postcopy-preempt")
        for c in (s, d):
            c.execute("migrate-set-capabilities", capabilities=caps)
        # Slow enough that precopy is still running when postcopy is asked for.
        s.execute("migrate-set-parameters", **{"multifd-channels": 2,
                                               "max-bandwidth": 8 * MIB})
        d.execute("migrate-incoming", uri=uri)
        s.execute("migrate", uri=uri)
        wait_migration(s, until=("active",))
        time.sleep(0.5)  # some pages on the multifd channels first
        s.execute("migrate-start-postcopy")
        src_info, dst_info = wait_migration(s), wait_migration(d)
        assert src_info["status"] == "completed", src_info
        assert dst_info["status"] == "completed", dst_info
        assert src_info["ram"]["postcopy-bytes"] > 0
        assert src_info["ram"]["precopy-bytes"] > MIB
        assert status(d) == "running"
        assert dst.vm.serial.wait_for(3, timeout=60), dst.vm.serial.output
        assert b"E" not in dst.vm.serial.output
        check = guest_check(d)
        assert check["bad_pages"] == 0, check


@pytest.mark.parametrize("value", [0, 256, -1, "2", True])
def test_bad_multifd_channels_values_are_refused(tmp_path: Path, value: object) -> None:
    with halt_instance(tmp_path) as src, client(qmp_path(src)) as s:
        with pytest.raises(QmpError, match="multifd-channels"):
            s.execute("migrate-set-parameters", **{"multifd-channels": value})
        assert s.execute("query-migrate-parameters")["multifd-channels"] == 2
        s.execute("migrate-set-parameters", **{"multifd-channels": 255})
        assert s.execute("query-migrate-parameters")["multifd-channels"] == 255


def test_multifd_to_a_file_is_refused(tmp_path: Path) -> None:
    with halt_instance(tmp_path) as src, client(qmp_path(src)) as s:
        s.execute("migrate-set-capabilities", capabilities=multifd_caps())
        with pytest.raises(QmpError, match="multifd needs a tcp: or unix: URI"):
            s.execute("migrate", uri=f"file:{tmp_path / 'image'}")
        assert status(s) == "running"


def kill_tcp_connection(local_port: int) -> int:
    """Destroy the TCP connection(s) with ``local_port`` at either end (``ss -K``)."""
    out = run_command(["ss", "-K", "-t", "-n", "-H", "state", "established", "(", "sport",
                       "=", f":{local_port}", "or", "dport", "=", f":{local_port}", ")"])
    return len(out.splitlines())


def test_killed_multifd_channel_fails_precopy_and_source_keeps_running(
        tmp_path: Path) -> None:
    uri = tcp_uri()
    with ab_instance(tmp_path) as src, empty_instance(tmp_path) as dst, \
            client(qmp_path(src)) as s, client(qmp_path(dst)) as d:
        # Slow: the precopy is still running when the channel's connection is killed.
        info = start_slow_multifd(s, d, uri)
        assert kill_tcp_connection(info["x-multifd"]["local-ports"][1]) >= 1
        src_info = wait_migration(s)
        assert src_info["status"] == "failed", src_info
        assert "multifd channel 1" in src_info["error-desc"]
        assert wait_migration(d)["status"] == "failed"
        # The source guest never stopped and still passes.
        assert status(s) == "running"
        assert src.vm.serial.wait_for(2, timeout=60)
        assert b"E" not in src.vm.serial.output


def test_a_source_migrates_over_multifd_again_after_a_completed_migration(
        tmp_path: Path) -> None:
    with halt_instance(tmp_path) as src, empty_instance(tmp_path, name="dst1") as dst1, \
            empty_instance(tmp_path, name="dst2") as dst2, client(qmp_path(src)) as s:
        s.execute("stop")
        s.execute("migrate-set-capabilities", capabilities=multifd_caps())
        for dst in (dst1, dst2):
            uri = tcp_uri()
            with client(qmp_path(dst)) as d:
                d.execute("migrate-set-capabilities", capabilities=multifd_caps())
                d.execute("migrate-incoming", uri=uri)
                s.execute("migrate", uri=uri)
                src_info, dst_info = wait_migration(s), wait_migration(d)
            assert (src_info["status"], dst_info["status"]) == ("completed", "completed")
            assert same_ram(src.vm, dst.vm)
