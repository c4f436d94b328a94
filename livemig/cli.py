"""The ``livemig`` command line: run a VM, migrate it, and the demo.

Every livemig error becomes a one-line message and exit status 1 (no traceback);
``--debug`` shows the traceback and debug logs for developers.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from livemig.errors import LivemigError, QmpError
from livemig.guests import GUEST_NAMES, load_image, load_image_file
from livemig.guests.os import OS_GUEST
from livemig.instance import Instance
from livemig.kernel.mman import Backing, keep_freed_buffers
from livemig.migration.helper import HelperServer
from livemig.migration.state import MigrationStatus, UrgentMode
from livemig.objects import parse_object
from livemig.vmm.boot import boot_image, boot_os
from livemig.vmm.console import Console, open_console
from livemig.vmm.cpuid import FEATURES, CpuidPolicy
from livemig.vmm.membackend import MemoryBackend, guest_ram_backend
from livemig.vmm.serial import Sink
from livemig.vmm.vm import Vm, VmConfig, parse_size

RUN_GUESTS = (*GUEST_NAMES, OS_GUEST)
# --page-size: every backing but 4K-memfd, which is a memory-backend-memfd object.
PAGE_SIZES = tuple(b.value for b in Backing if b is not Backing.MEMFD_4K)

F = TypeVar("F", bound=Callable[..., Any])


def _friendly_errors(fn: F) -> F:
    """Turn livemig errors into one-line CLI errors (exit 1)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LivemigError as e:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(str(e)) from None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


@click.group()
@click.option("--debug", is_flag=True, help="Debug logging and full tracebacks.")
def main(debug: bool) -> None:
    """livemig: live migration of KVM virtual machines (precopy, postcopy, preempt)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


@contextlib.contextmanager
def _serial_sink(path: str | None, console_spec: str | None) -> Iterator[Sink]:
    if console_spec is not None:
        console = open_console(console_spec)
        try:
            yield console
        finally:
            console.close()
    elif path is None:
        yield sys.stdout.buffer
    else:
        with open(path, "wb") as f:
            yield f


def _quit_on_signals(instance: Instance) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: instance.request_quit())


@main.command()
@click.option("--guest", help=f"Built-in guest program: {', '.join(RUN_GUESTS)}.")
@click.option("--image", type=click.Path(dir_okay=False), help="Any 512-byte boot sector.")
@click.option("--mem", help="Guest RAM size [default: 256M, or the memory backend's].")
@click.option("--page-size", type=click.Choice(PAGE_SIZES, case_sensitive=False),
              help="Guest RAM backing: private 4K pages (the default), THP, or hugetlbfs "
                   "2M / 1G pages.  For shared RAM use --object memory-backend-memfd.")
@click.option("--mem-prealloc", "prealloc", is_flag=True,
              help="Fault all of guest RAM in at start (QEMU's -mem-prealloc): a migration "
                   "into this VM then does not pay the first touch of its memory.")
@click.option("--qmp", "qmp_path", type=click.Path(), help="QMP unix socket path.")
@click.option("--serial", type=click.Path(dir_okay=False), help="Serial output file.")
@click.option("--console", "console_spec", metavar="stdio|unix:PATH",
              help="Interactive serial console (input and output) instead of --serial.")
@click.option("--smp", default=1, show_default=True, help="Number of vCPUs.")
@click.option("--cpuid-hide", default="", metavar="FEATURE,...",
              help=f"CPUID features to hide from the guest: {', '.join(sorted(FEATURES))}.")
@click.option("--duration", type=float, help="Quit after this many seconds.")
@click.option("-S", "paused", is_flag=True, help="Do not start the vCPUs (cont over QMP).")
@click.option("--incoming", help="Wait for a migration on this URI (tcp:HOST:PORT, "
              "unix:PATH, file:PATH), or 'defer' to wait for QMP migrate-incoming.  With "
              "the source's --guest/--image (as QEMU's -kernel), system_reset boots it.")
@click.option("--trace", "trace", multiple=True, metavar="PATTERN",
              help="Write trace events matching PATTERN (e.g. 'postcopy_preempt*') as JSON "
                   "lines to stderr, as QEMU's -trace.")
@click.option("--object", "objects", multiple=True, metavar="TYPE,id=ID,...",
              help="Create an object as QEMU's -object: tls-creds-x509,id=ID,dir=DIR,"
                   "endpoint=server|client,verify-peer=on|off, authz-simple,id=ID,"
                   "identity=DN or authz-list,id=ID,policy=allow|deny,rules.0.match=DN,"
                   "rules.0.policy=allow|deny,rules.0.format=exact|glob,... (then set the "
                   "tls-creds / tls-authz parameters); memory-backend-memfd,id=ID,size=SIZE,"
                   "share=on[,hugetlb=on,hugetlbsize=2M|1G][,prealloc=on] for guest RAM "
                   "in a shared memfd (with --machine memory-backend=ID).")
@click.option("--machine", metavar="memory-backend=ID",
              help="As QEMU's -machine memory-backend=ID: guest RAM is that --object "
                   "memory-backend-memfd (postcopy's helper processes then map it, no copy).")
@_friendly_errors
def run(guest: str | None, image: str | None, mem: str, page_size: str, prealloc: bool,
        qmp_path: str | None,
        serial: str | None, console_spec: str | None, smp: int, cpuid_hide: str,
        duration: float | None, paused: bool, incoming: str | None,
        trace: tuple[str, ...], objects: tuple[str, ...], machine: str | None) -> None:
    """Run a VM until `quit` over QMP, a signal, or --duration."""
    if guest is not None and image is not None:
        raise click.UsageError("give one of --guest or --image, not both")
    if incoming is None and guest is None and image is None:
        raise click.UsageError("give --guest or --image (or --incoming)")
    if serial is not None and console_spec is not None:
        raise click.UsageError("give --serial or --console, not both")
    hide = frozenset(f for f in cpuid_hide.split(",") if f)
    parsed = [parse_object(spec) for spec in objects]
    backend = guest_ram_backend(
        {b.id: b for b in (MemoryBackend.from_object(t, p) for t, p in parsed
                           if MemoryBackend.is_memory_backend(t))}, machine)
    if backend is None:
        size, backing = parse_size(mem or "256M"), Backing.parse(page_size or "4K")
    else:
        if page_size is not None:
            raise click.UsageError("give --page-size or a memory backend, not both")
        if mem is not None and parse_size(mem) != backend.size:
            raise click.UsageError(f"--mem {mem} does not match the size of memory "
                                   f"backend '{backend.id}'")
        size, backing, prealloc = backend.size, backend.backing, prealloc or backend.prealloc
    config = VmConfig(size, backing, vcpus=smp, cpuid=CpuidPolicy(hide), prealloc=prealloc)
    keep_freed_buffers()
    # A migration's helper processes are forked from a fork of this process made now,
    # while it has one thread and no guest RAM: they start in milliseconds, with
    # nothing to import (livemig.migration.helper).
    helpers = HelperServer.started_early()
    with _serial_sink(serial, console_spec) as sink, \
            Instance(Vm(config, sink), qmp_path, exit_after_incoming=incoming is not None,
                     trace=trace, trace_sink=sys.stderr, helpers=helpers) as inst:
        if isinstance(sink, Console):
            sink.attach(inst.vm.serial)
        for qom_type, props in parsed:
            if not MemoryBackend.is_memory_backend(qom_type):
                inst.objects.add(qom_type, props)
        _quit_on_signals(inst)
        # A destination keeps its boot options for system_reset only (as QEMU's -kernel).
        if guest == OS_GUEST:
            boot_os(inst.vm, incoming=incoming is not None)
        elif guest is not None or image is not None:
            boot_image(inst.vm, load_image(guest) if guest else load_image_file(image or ""),
                       incoming=incoming is not None)
        if incoming is not None:
            if incoming != "defer":
                inst.migrate_incoming(incoming)
        elif not paused:
            inst.vm.start()
        deadline = None if duration is None else time.monotonic() + duration
        # Wake up regularly so signal handlers run in the main thread.
        while not inst.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                break
        # As QEMU: a failed incoming migration ends the process with an error.
        if inst.incoming is not None and inst.incoming.status.status is MigrationStatus.FAILED:
            raise click.ClickException("incoming migration failed: "
                                       f"{inst.incoming.info.error_desc or 'no reason given'}")


@main.command()
@click.option("--qmp", "qmp_path", required=True, type=click.Path(), help="Source QMP socket.")
@click.option("--to", "uri", required=True, help="Destination URI (tcp:, unix:, file:).")
@click.option("--dest-qmp", type=click.Path(),
              help="Destination QMP socket: the same capabilities are set there (it must "
                   "wait with --incoming defer; its migrate-incoming is then sent too), "
                   "and both sides are checked to agree.")
@click.option("--watch/--no-watch", default=True, help="Show progress until it ends.")
@click.option("--max-bandwidth", type=int, help="Bytes per second (0 = unlimited).")
@click.option("--downtime-limit", type=int, help="Milliseconds.")
@click.option("--postcopy", is_flag=True,
              help="Switch to postcopy: after --postcopy-after seconds, or when precopy "
                   "stops converging.")
@click.option("--postcopy-after", type=float, metavar="SECONDS",
              help="Switch to postcopy this long after the start.")
@click.option("--preempt", is_flag=True, help="Postcopy with preemption (implies --postcopy).")
@click.option("--urgent-sender", type=click.Choice([m.value for m in UrgentMode]),
              help="Who sends requested pages with --preempt (x-postcopy-urgent-sender).")
@click.option("--max-postcopy-bandwidth", type=int,
              help="Bytes per second of background pages in postcopy (0 = unlimited).")
@click.option("--resume", is_flag=True,
              help="Go on with a paused postcopy over a new connection to URI (QEMU's "
                   "migrate resume=true); with --dest-qmp the destination is told to "
                   "listen there first (migrate-recover).")
@click.option("--multifd-channels", type=int, metavar="N",
              help="Precopy pages on N multifd connections (capability multifd; set on "
                   "the destination too, e.g. with --dest-qmp).")
@_friendly_errors
def migrate(qmp_path: str, uri: str, dest_qmp: str | None, watch: bool,
            max_bandwidth: int | None, downtime_limit: int | None, postcopy: bool,
            postcopy_after: float | None, preempt: bool, urgent_sender: str | None,
            max_postcopy_bandwidth: int | None, resume: bool,
            multifd_channels: int | None) -> None:
    """Migrate the VM behind a QMP socket to URI, showing its progress."""
    from rich.console import Console

    from livemig.control.client import QmpClient
    from livemig.demo import PostcopySwitch, watch_migration

    if resume:
        if postcopy or preempt or postcopy_after is not None or urgent_sender is not None:
            raise click.UsageError("--resume goes on with the paused migration as it was: "
                                   "drop --postcopy, --preempt, --postcopy-after and "
                                   "--urgent-sender")
        _resume(qmp_path, uri, dest_qmp, watch, _parameters(
            max_bandwidth, downtime_limit, max_postcopy_bandwidth, None))
        return
    postcopy = postcopy or preempt
    if postcopy_after is not None and not postcopy:
        raise click.UsageError("--postcopy-after needs --postcopy")
    if urgent_sender is not None and not preempt:
        raise click.UsageError("--urgent-sender needs --preempt")
    if postcopy and not watch:
        raise click.UsageError("--postcopy switches while it watches: drop --no-watch")
    caps = {"postcopy-ram": postcopy, "postcopy-preempt": preempt,
            "multifd": multifd_channels is not None}
    params = _parameters(max_bandwidth, downtime_limit, max_postcopy_bandwidth, urgent_sender,
                         multifd_channels)
    with QmpClient(qmp_path) as qmp, \
            (QmpClient(dest_qmp) if dest_qmp else contextlib.nullcontext()) as dst:
        _set_capabilities(qmp, caps, "source")
        if dst is not None:
            _start_destination(dst, caps, uri)
            _check_agreement(qmp, dst)
        if params:
            qmp.execute("migrate-set-parameters", **params)
        qmp.execute("migrate", uri=uri)
        if watch:
            hook = PostcopySwitch(qmp, postcopy_after) if postcopy else None
            info = watch_migration(qmp, Console(), timeout=24 * 3600, on_active=hook)
            if info["status"] != "completed":
                raise click.ClickException(f"migration {info['status']}: "
                                           f"{info.get('error-desc', '')}")


def _parameters(max_bandwidth: int | None, downtime_limit: int | None,
                max_postcopy_bandwidth: int | None, urgent_sender: str | None,
                multifd_channels: int | None = None) -> dict[str, Any]:
    """The migration parameters given on the command line, by their QMP names."""
    return {k: v for k, v in (("max-bandwidth", max_bandwidth),
                              ("multifd-channels", multifd_channels),
                              ("downtime-limit", downtime_limit),
                              ("max-postcopy-bandwidth", max_postcopy_bandwidth),
                              ("x-postcopy-urgent-sender", urgent_sender)) if v is not None}


def _resume(qmp_path: str, uri: str, dest_qmp: str | None, watch: bool,
            params: dict[str, Any]) -> None:
    """``livemig migrate --resume``: migrate-recover on the destination (if given),
    then migrate resume=true on the source; watch until it completes, or pauses again
    (the new connection failed too: then resume again)."""
    from rich.console import Console

    from livemig.control.client import QmpClient
    from livemig.demo import watch_migration

    with QmpClient(qmp_path) as qmp:
        if dest_qmp is not None:
            with QmpClient(dest_qmp) as dst:
                dst.execute("migrate-recover", uri=uri)
        if params:
            qmp.execute("migrate-set-parameters", **params)
        qmp.execute("migrate", uri=uri, resume=True)
        if watch:
            info = watch_migration(qmp, Console(), timeout=24 * 3600,
                                   until=(MigrationStatus.POSTCOPY_PAUSED,))
            if info["status"] == MigrationStatus.POSTCOPY_PAUSED.value:
                raise click.ClickException(
                    f"the resume failed, the migration is paused again: "
                    f"{info.get('error-desc', '')}; resume it again")
            if info["status"] != "completed":
                raise click.ClickException(f"migration {info['status']}: "
                                           f"{info.get('error-desc', '')}")


@main.command()
@click.option("--qmp", "qmp_path", required=True, type=click.Path(),
              help="Destination QMP socket.")
@click.option("--listen", "uri", required=True,
              help="URI to wait on for the source's resumed connections.")
@_friendly_errors
def recover(qmp_path: str, uri: str) -> None:
    """On the destination of a paused postcopy: listen on URI for the source, which
    then resumes with ``livemig migrate --resume --to URI`` (QEMU's migrate-recover)."""
    from livemig.control.client import QmpClient

    with QmpClient(qmp_path) as qmp:
        qmp.execute("migrate-recover", uri=uri)


def _set_capabilities(qmp: Any, caps: dict[str, bool], side: str) -> None:
    """Turn on the capabilities asked for (others stay as the side has them)."""
    wanted = [{"capability": name, "state": True} for name, on in caps.items() if on]
    if not wanted:
        return
    try:
        qmp.execute("migrate-set-capabilities", capabilities=wanted)
    except QmpError as e:
        raise click.ClickException(f"cannot set {', '.join(n for n, on in caps.items() if on)}"
                                   f" on the {side}: {e}") from None


def _start_destination(dst: Any, caps: dict[str, bool], uri: str) -> None:
    """Capabilities first, then migrate-incoming, as QEMU's -incoming defer needs."""
    waiting = dst.execute("query-migrate").get("status", "none") == "none"
    if not waiting and any(caps.values()):
        raise click.ClickException(
            "the destination's incoming migration has already started, so its "
            "capabilities cannot change: start it with --incoming defer")
    _set_capabilities(dst, caps, "destination")
    if waiting:
        dst.execute("migrate-incoming", uri=uri)


AGREED_CAPABILITIES = ("postcopy-ram", "postcopy-preempt", "multifd")


def _check_agreement(src: Any, dst: Any) -> None:
    """Both sides must have the same postcopy and multifd capabilities (the stream's
    handshake would refuse the migration later; say it now, by name)."""
    def caps(qmp: Any) -> dict[str, bool]:
        return {c["capability"]: c["state"]
                for c in qmp.execute("query-migrate-capabilities")}

    theirs, ours = caps(dst), caps(src)
    differ = [n for n in AGREED_CAPABILITIES if theirs.get(n) != ours.get(n)]
    if differ:
        raise click.ClickException(
            "source and destination disagree on " + ", ".join(
                f"{n} (source {'on' if ours.get(n) else 'off'}, destination "
                f"{'on' if theirs.get(n) else 'off'})" for n in differ)
            + ": set the same on both sides")


@main.command()
@click.option("--mode", default="precopy", show_default=True,
              type=click.Choice(["precopy", "postcopy", "preempt"]))
@click.option("--guest", default="ab", show_default=True, type=click.Choice(RUN_GUESTS))
@click.option("--mem", default="256M", show_default=True)
@click.option("--page-size", default="4K", show_default=True,
              type=click.Choice([b.value for b in Backing], case_sensitive=False))
@click.option("--smp", default=1, show_default=True, help="Number of vCPUs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write the report as JSON.")
@_friendly_errors
def demo(mode: str, guest: str, mem: str, page_size: str, smp: int,
         json_path: str | None) -> None:
    """Migrate a running guest between two local livemig processes and report."""
    from rich.console import Console

    from livemig.demo import DemoConfig, report_table, run_demo, write_json

    console = Console()
    report = run_demo(DemoConfig(mode=mode, guest=guest, mem=mem, page_size=page_size,
                                 smp=smp), console)
    console.print(report_table(report))
    if json_path:
        write_json(report, json_path)
    check = report["check"]
    if check["bad_pages"] or check["guest_error"] or not check["guest_ran_on"]:
        raise click.ClickException("the migrated guest failed its memory check")


if __name__ == "__main__":
    main()
