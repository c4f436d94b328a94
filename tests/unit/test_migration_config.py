"""Capabilities, parameters, the handshake and the choice of urgent-sender design.

Parameters are checked per field from the dataclass's declared types; errors are the
migration layer's own (ConfigError), mapped to QMP only by the command table.  The
urgent-sender design is picked once from a parameter snapshot, and a running migration
takes only the live fields of a later migrate-set-parameters.
"""

from __future__ import annotations

import pytest

from livemig.errors import ConfigError, MigrationError, QmpError, RemoteProtocolError
from livemig.migration.handshake import Handshake
from livemig.migration.helper import HelperServer
from livemig.migration.state import LIVE_PARAMETERS, Capabilities, Parameters, UrgentMode
from livemig.migration.urgent_sender import (
    MigrationThreadSender,
    ProcessSender,
    ReturnPathSender,
    choose_urgent_sender,
)


@pytest.mark.parametrize(("name", "value", "says"), [
    ("max-bandwidth", -1, "non-negative integer"),
    ("max-bandwidth", True, "non-negative integer"),
    ("downtime-limit", "300", "non-negative integer"),
    ("x-postcopy-locality", 1, "boolean"),
    ("x-postcopy-urgent-sender", "thread", "migration, return-path, process"),
    ("x-postcopy-urgent-sender", 2, "migration, return-path, process"),
    ("no-such-parameter", 1, "is unexpected"),
    ("max-bandwidth", 10**30, "range of 0 to 18446744073709551615 bytes/second"),
    ("max-postcopy-bandwidth", 1 << 64, "range of 0 to 18446744073709551615"),
    ("downtime-limit", 2_000_001, "range of 0 to 2000000 milliseconds"),
    ("x-max-iterations", 2**63, "range of 0 to 100000 rounds"),
])
def test_a_bad_parameter_is_refused_with_what_it_takes(name: str, value: object,
                                                       says: str) -> None:
    with pytest.raises(ConfigError, match=says) as err:
        Parameters().updated({name: value})
    assert not isinstance(err.value, QmpError)  # the migration layer's own error


def test_parameters_take_their_upper_bounds() -> None:
    p = Parameters().updated({"max-bandwidth": (1 << 64) - 1, "downtime-limit": 2_000_000,
                              "x-max-iterations": 100_000})
    assert p.to_qmp()["max-bandwidth"] == (1 << 64) - 1


def test_parameters_take_the_enum_by_value_and_report_it_by_value() -> None:
    p = Parameters().updated({"x-postcopy-urgent-sender": "return-path",
                              "max-bandwidth": 5, "x-postcopy-locality": False})
    assert p.x_postcopy_urgent_sender is UrgentMode.RETURN_PATH
    qmp = p.to_qmp()
    assert (qmp["x-postcopy-urgent-sender"], qmp["max-bandwidth"],
            qmp["x-postcopy-locality"]) == ("return-path", 5, False)


@pytest.mark.parametrize(("changes", "says"), [
    ([{"capability": "postcopy-rum", "state": True}], "not found"),
    ([{"capability": "postcopy-ram", "state": "on"}], "boolean"),
    ([{"capability": "postcopy-preempt", "state": True}], "requires postcopy-ram"),
])
def test_a_bad_capability_is_refused(changes: list[dict[str, object]], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Capabilities().updated(changes)


def test_a_running_migration_takes_only_the_live_parameters() -> None:
    at_migrate = Parameters(x_postcopy_urgent_sender=UrgentMode.RETURN_PATH)
    later = Parameters(max_bandwidth=7, downtime_limit=9, max_postcopy_bandwidth=11,
                       x_postcopy_urgent_sender=UrgentMode.MIGRATION,
                       x_postcopy_preempt_break_huge=False, x_postcopy_locality=False,
                       x_max_iterations=3)
    now = at_migrate.live_update(later)
    for name in LIVE_PARAMETERS:
        assert getattr(now, name) == getattr(later, name)
    assert now.x_postcopy_urgent_sender is UrgentMode.RETURN_PATH
    assert now.x_postcopy_preempt_break_huge and now.x_postcopy_locality
    assert now.x_max_iterations == at_migrate.x_max_iterations


PREEMPT = Capabilities(postcopy_ram=True, postcopy_preempt=True)


@pytest.mark.parametrize(("mode", "design"), [
    (UrgentMode.MIGRATION, MigrationThreadSender),
    (UrgentMode.RETURN_PATH, ReturnPathSender),
    (UrgentMode.PROCESS, ProcessSender),
])
def test_each_mode_is_one_design(mode: UrgentMode, design: type) -> None:
    chosen = choose_urgent_sender(PREEMPT, Parameters(x_postcopy_urgent_sender=mode),
                                  HelperServer())
    assert type(chosen) is design and chosen.mode is mode
    # Only the process design tells the destination to send requests on its channel.
    assert chosen.handshake().urgent_process == (mode is UrgentMode.PROCESS)


@pytest.mark.parametrize("mode", list(UrgentMode))
def test_without_preemption_the_migration_thread_serves_requests(mode: UrgentMode) -> None:
    caps = Capabilities(postcopy_ram=True)
    chosen = choose_urgent_sender(caps, Parameters(x_postcopy_urgent_sender=mode),
                                  HelperServer())
    assert type(chosen) is MigrationThreadSender
    assert not chosen.handshake().urgent_process


@pytest.mark.parametrize("hs", [Handshake(), Handshake(postcopy_ram=True),
                                Handshake(True, True), Handshake(True, True, True)])
def test_the_handshake_survives_the_wire(hs: Handshake) -> None:
    assert Handshake.decode(hs.encode()) == hs


def test_the_handshake_refuses_a_capability_mismatch() -> None:
    theirs = Handshake.decode(Handshake(True, True).encode())
    with pytest.raises(MigrationError, match=r"source has \[postcopy-ram,postcopy-preempt\]"):
        theirs.check_matches(Capabilities(postcopy_ram=True))
    theirs.check_matches(PREEMPT)  # the same on both sides: fine


def test_the_handshake_refuses_unknown_capabilities() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown capabilities"):
        Handshake.decode(b"postcopy-ram,auto-converge")
