"""A short, time-boxed coverage-guided pass of every fuzz target (fuzz/run.py).

Each target runs about 7 s from its recorded seeds: it must execute inputs, reach
coverage, and find nothing (no exception but livemig's typed errors, no hang, no memory
blow-up).  Long runs toward a million inputs per target: ``python fuzz/run.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install -e '.[fuzz]')")

pytestmark = pytest.mark.fuzz
RUN = Path(__file__).resolve().parents[2] / "fuzz" / "run.py"


def test_every_fuzz_target_survives_a_short_pass(tmp_path: Path) -> None:
    out = tmp_path / "outcomes.json"
    proc = subprocess.run([sys.executable, str(RUN), "--seconds", "7",
                           "--findings", str(tmp_path / "findings"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    outcomes = json.loads(out.read_text())
    assert proc.returncode == 0, (proc.stdout, outcomes)
    assert {o["target"] for o in outcomes} == {
        "stream", "postcopy", "returnpath", "recovery", "multifd", "qmp", "helper",
        "devstate"}
    for o in outcomes:
        assert o["inputs"] > 1000 and o["coverage"] > 0 and not o["findings"], o
