"""Guest images, their parameter block, and the host-side memory checks."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.errors import ConfigError
from livemig.guests import (
    DEFAULT_RANGE_END,
    DEFAULT_RANGE_START,
    GUEST_NAMES,
    IMAGE_SIZE,
    MAGIC,
    MAGIC_OFFSET,
    RANGE_START_OFFSET,
    load_image,
    load_image_file,
    patch_range,
    read_range,
)
from livemig.vmm.checks import ab_check, random_check

REPO = Path(__file__).resolve().parents[2]
PAGE = 4096
START = 4 * PAGE  # a range that does not start at 0, to exercise absolute page numbers
START_PAGE = START // PAGE


def ab_ram(heads: list[int]) -> npt.NDArray[np.uint8]:
    """RAM whose ab range [START, ...) has the given first bytes (rest random noise)."""
    ram = np.random.default_rng(0).integers(0, 256, START + len(heads) * PAGE, dtype=np.uint8)
    ram[START::PAGE] = heads
    return ram


def random_ram(pages: int) -> npt.NDArray[np.uint8]:
    ram = np.random.default_rng(0).integers(0, 256, START + pages * PAGE, dtype=np.uint8)
    tags = np.arange(START_PAGE, START_PAGE + pages, dtype="<u4").view(np.uint8).reshape(-1, 4)
    ram[START:].reshape(-1, PAGE)[:, :4] = tags
    return ram


def ab_pattern(n: int, v: int, k: int) -> list[int]:
    return [(v + 1) % 256] * k + [v] * (n - k)


# --- images ---------------------------------------------------------------------


@pytest.mark.parametrize("name", GUEST_NAMES)
def test_builtin_image_is_a_boot_sector_with_param_block(name: str) -> None:
    image = load_image(name)
    assert len(image) == IMAGE_SIZE
    assert image[-2:] == b"\x55\xaa"
    assert image[MAGIC_OFFSET : MAGIC_OFFSET + 4] == MAGIC
    assert read_range(image) == (DEFAULT_RANGE_START, DEFAULT_RANGE_END)
    assert image[0x1FC:0x1FE] == b"\0\0"


def test_unknown_guest_is_a_config_error_listing_valid_names() -> None:
    with pytest.raises(ConfigError, match="ab, random"):
        load_image("nope")


def test_patch_range_round_trip_touches_only_the_range_fields() -> None:
    image = load_image("ab")
    patched = patch_range(image, 1 << 20, 64 << 20)
    assert read_range(patched) == (1 << 20, 64 << 20)
    assert struct.unpack_from("<II", patched, RANGE_START_OFFSET) == (1 << 20, 64 << 20)
    assert patched[:RANGE_START_OFFSET] == image[:RANGE_START_OFFSET]
    assert patched[0x1FC:] == image[0x1FC:]


def test_patch_range_leaves_foreign_images_unchanged() -> None:
    foreign = bytes(510) + b"\x55\xaa"
    assert patch_range(foreign, 1 << 20, 64 << 20) is foreign
    assert read_range(foreign) is None


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0x100001, 0x200000),
        (0x100000, 0x200800),
        (0x200000, 0x100000),
        (0, 0x100000),
        (0x100000, 0x1_0000_0000),
    ],
)
def test_patch_range_rejects_bad_ranges(start: int, end: int) -> None:
    with pytest.raises(ConfigError):
        patch_range(load_image("random"), start, end)


def test_load_image_file_accepts_a_boot_sector(tmp_path: Path) -> None:
    path = tmp_path / "g.bin"
    path.write_bytes(load_image("ab"))
    assert load_image_file(path) == load_image("ab")


@pytest.mark.parametrize("data", [bytes(511) + b"\xaa", bytes(510) + b"\x55\xaa\x00", bytes(512)])
def test_load_image_file_rejects_non_boot_sectors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "g.bin"
    path.write_bytes(data)
    with pytest.raises(ConfigError):
        load_image_file(path)


def test_load_image_file_missing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot read"):
        load_image_file(tmp_path / "missing.bin")


@pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed")
def test_checked_in_images_match_their_sources() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "guests" / "build.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


# --- ab_check -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("v", "k"), [(7, 0), (7, 10), (7, 3), (255, 4), (255, 0), (255, 10), (0, 5)]
)
def test_ab_good_pattern_has_no_bad_pages(v: int, k: int) -> None:
    result = ab_check(ab_ram(ab_pattern(10, v, k)), START, START + 10 * PAGE)
    assert result.ok
    assert result.pages == 10
    assert result.bad_pages == ()


def test_ab_reports_the_value_and_boundary_of_the_sweep() -> None:
    result = ab_check(ab_ram(ab_pattern(10, 255, 4)), START, START + 10 * PAGE)
    assert (result.value, result.boundary) == (255, 4)


def test_ab_uniform_range_is_reported_with_boundary_zero() -> None:
    result = ab_check(ab_ram([9] * 6), START, START + 6 * PAGE)
    assert (result.value, result.boundary, result.bad_pages) == (9, 0, ())


@pytest.mark.parametrize(("k", "bad", "wrong"), [(5, 2, 7), (5, 8, 9), (5, 5, 3), (0, 0, 200)])
def test_ab_single_corrupted_page_is_reported_exactly(k: int, bad: int, wrong: int) -> None:
    heads = ab_pattern(12, 7, k)
    heads[bad] = wrong
    result = ab_check(ab_ram(heads), START, START + 12 * PAGE)
    assert result.bad_pages == (START_PAGE + bad,)
    assert not result.ok


def test_ab_page_that_missed_an_update_is_reported() -> None:
    # A page behind the sweep still holding the old value: an update was lost.
    heads = ab_pattern(12, 7, 6)
    heads[3] = 7
    result = ab_check(ab_ram(heads), START, START + 12 * PAGE)
    assert result.bad_pages == (START_PAGE + 3,)


def test_ab_accepts_a_memoryview() -> None:
    ram = ab_ram(ab_pattern(4, 1, 2))
    assert ab_check(memoryview(ram.tobytes()), START, START + 4 * PAGE).ok


def test_ab_empty_range_is_ok() -> None:
    assert ab_check(ab_ram([]), START, START).pages == 0


def _brute_ab_cost(heads: list[int]) -> int:
    n = len(heads)
    return min(
        sum(h != (v + 1) % 256 for h in heads[:k]) + sum(h != v for h in heads[k:])
        for v in range(256)
        for k in range(n + 1)
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 3, 254, 255]), max_size=7))
def test_ab_reports_the_fewest_bad_pages_any_split_allows(heads: list[int]) -> None:
    result = ab_check(ab_ram(heads), START, START + len(heads) * PAGE)
    assert len(result.bad_pages) == _brute_ab_cost(heads)
    expected = ab_pattern(len(heads), result.value, result.boundary)
    assert result.bad_pages == tuple(
        START_PAGE + i for i, (h, e) in enumerate(zip(heads, expected, strict=True)) if h != e
    )


@pytest.mark.parametrize(("start", "end"), [(START + 1, START + PAGE), (START, 10**9)])
def test_checks_reject_misaligned_or_oversized_ranges(start: int, end: int) -> None:
    ram = ab_ram([0] * 2)
    with pytest.raises(ConfigError):
        ab_check(ram, start, end)
    with pytest.raises(ConfigError):
        random_check(ram, start, end)


# --- random_check ---------------------------------------------------------------


def test_random_good_tags_have_no_bad_pages() -> None:
    result = random_check(random_ram(9), START, START + 9 * PAGE)
    assert result.ok
    assert result.pages == 9


@pytest.mark.parametrize("byte", [0, 1, 3])
def test_random_single_corrupted_tag_is_reported_exactly(byte: int) -> None:
    ram = random_ram(9)
    ram[START + 6 * PAGE + byte] ^= 0x10
    ram[START + 2 * PAGE + 100] ^= 0xFF  # the rest of a page is the guest's to scribble on
    result = random_check(ram.data, START, START + 9 * PAGE)
    assert result.bad_pages == (START_PAGE + 6,)


def test_random_page_copied_to_the_wrong_place_is_reported() -> None:
    ram = random_ram(9)
    pages = ram[START:].reshape(-1, PAGE)
    pages[4] = pages[5]
    assert random_check(ram, START, START + 9 * PAGE).bad_pages == (START_PAGE + 4,)
