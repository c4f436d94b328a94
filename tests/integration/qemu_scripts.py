"""QEMU's own ``scripts/analyze-migration.py``, fetched at test time (never committed).

The script is not in any Debian binary package, so it comes from Debian's ``qemu``
source package: a private apt configuration (its own source list, package lists and
cache under the user's cache directory) adds ``deb-src`` entries for the archive this
machine already uses, ``apt-get source --download-only`` fetches the upstream tarball
and only the script is extracted.  Nothing of the system's apt state changes.  Each
version is cached, so later runs need no network.  :func:`analyze_script` returns the
path, or raises :class:`Unavailable` with the reason (the tests skip with it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

# Which Debian release carries which QEMU: 7.2 (what livemig measures against) and a
# current one.
RELEASES = {"7.2": "bookworm", "current": "trixie"}
SCRIPT = "scripts/analyze-migration.py"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "livemig-qemu-scripts"


class Unavailable(Exception):
    """The script cannot be had here (no apt-get, no archive reachable, ...)."""


def analyze_script(version: str) -> Path:
    target = CACHE / version / "analyze-migration.py"
    if target.exists():
        return target
    if shutil.which("apt-get") is None:
        raise Unavailable("apt-get is not available to fetch QEMU's source package")
    apt_dir = CACHE / "apt"
    opts = _apt_options(apt_dir, RELEASES.values())
    _run(["apt-get", *opts, "update"], "apt-get update (deb-src)")
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", *opts, "source", "--download-only", f"qemu/{RELEASES[version]}"],
             f"apt-get source qemu/{RELEASES[version]}", cwd=tmp)
        tarballs = sorted(Path(tmp).glob("qemu_*.orig.tar.*"))
        if not tarballs:
            raise Unavailable(f"no upstream tarball in qemu/{RELEASES[version]}")
        with tarfile.open(tarballs[0]) as tar:
            member = next((m for m in tar if m.name.endswith("/" + SCRIPT)), None)
            if member is None:
                raise Unavailable(f"{tarballs[0].name} has no {SCRIPT}")
            data = tar.extractfile(member)
            assert data is not None
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data.read())
    return target


def _apt_options(apt_dir: Path, suites: Iterable[str]) -> list[str]:
    """A private apt configuration with deb-src lines for this machine's archive."""
    uris = _archive_uris()
    if not uris:
        raise Unavailable("this machine's apt sources name no Debian archive")
    (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = apt_dir / "sources.list"
    sources.write_text("".join(f"deb-src {uris[0]} {s} main\n" for s in suites))
    return ["-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={apt_dir / 'lists'}", "-o", f"Dir::Cache={apt_dir / 'cache'}",
            "-o", "APT::Sandbox::User=root", "-q"]


def _archive_uris() -> list[str]:
    """The main archive URIs of the system's apt sources (deb822 or one-line style)."""
    text = ""
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if path.suffix in (".list", ".sources") and path.is_file():
            text += path.read_text(errors="replace") + "\n"
    uris = re.findall(r"^URIs:\s*(\S+)", text, re.M)
    uris += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M)
    return [u for u in uris if u.rstrip("/").endswith("/debian")]


def _run(cmd: list[str], what: str, cwd: str | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"{what}: {e}") from None
    if proc.returncode != 0:
        raise Unavailable(f"{what} failed: {proc.stderr.strip()[-400:]}")
