"""When precopy stops and copies (source.Convergence): under downtime-limit, and not
while the rounds still shrink what is left."""

from __future__ import annotations

from livemig.migration.source import Convergence

MB = 1_000_000
LIMIT_S = 0.3
BW = 100 * MB  # bytes per second


def decisions(remaining: list[int], bw: float = BW) -> list[bool]:
    c = Convergence()
    return [c.ready(r, bw, LIMIT_S, rounds) for rounds, r in enumerate(remaining)]


def test_never_stops_before_the_first_round() -> None:
    assert decisions([1 * MB]) == [False]


def test_never_stops_while_the_pause_would_exceed_the_limit() -> None:
    assert decisions([500 * MB, 100 * MB, 40 * MB, 39 * MB]) == [False, False, False, False]


def test_stops_under_the_limit_once_a_round_no_longer_shrinks_what_is_left() -> None:
    assert decisions([500 * MB, 25 * MB, 24 * MB]) == [False, False, True]


def test_goes_on_under_the_limit_while_rounds_still_shrink_what_is_left() -> None:
    # 25 MB would be a 250 ms pause: under the limit, but the round before left 4x more.
    assert decisions([100 * MB, 25 * MB, 10 * MB, 9 * MB]) == [False, False, False, True]


def test_stops_when_the_pause_is_a_few_milliseconds_even_if_still_shrinking() -> None:
    assert decisions([100 * MB, 10 * MB, 100_000]) == [False, False, True]


def test_without_a_measured_bandwidth_nothing_fits() -> None:
    assert decisions([100 * MB, 10 * MB, 0], bw=0) == [False, False, False]


def test_what_the_first_round_left_alone_does_not_stop_it() -> None:
    # A guest that dirtied all of RAM during the slow first round, then a quarter of
    # what each later round sends: the second round shows the rounds still shrink.
    bw = 4000 * MB
    assert decisions([268 * MB, 268 * MB, 67 * MB, 17 * MB], bw) == [
        False, False, False, True]


def test_a_guest_that_outruns_the_link_stops_after_the_second_round() -> None:
    bw = 4000 * MB
    assert decisions([268 * MB, 268 * MB, 268 * MB], bw) == [False, False, True]
