"""The test tiers (tests/conftest.py): tests on real weights are marked `real`, and the fast tier
(`bash scripts/test.sh fast`: -m "not slow and not real") keeps tests from every file.

These read what conftest's collection hook recorded about every collected test, before -m or -k
deselected any: the checks over all files skip unless the whole tests/ folder was collected.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ALL_REAL, BUILDERS, FAST_TIER, REAL_FIXTURES, TIERS

HERE = Path(__file__).parent


@pytest.fixture
def record(request) -> list[dict]:
    return request.config.stash[TIERS]


def _fast(test: dict) -> bool:
    return not {"slow", "real"} & test["marks"]


def test_tests_on_real_weights_are_marked_real(record):
    unmarked = [t["nodeid"] for t in record if set(REAL_FIXTURES) & set(t["fixtures"]) and "real" not in t["marks"]]
    assert not unmarked, "these use real weights but lack @pytest.mark.real:\n" + "\n".join(unmarked)


def test_every_fast_cases_marker_selects_a_case(record):
    marked = {(t["file"], t["function"]) for t in record if t["fast_cases"] is not None}
    selecting = {(t["file"], t["function"]) for t in record if t["fast_cases"]}
    assert marked == selecting, f"fast_cases markers that match no parametrized case: {sorted(marked - selecting)}"


def test_every_file_keeps_tests_in_the_fast_tier(record):
    on_disk = {p.name for p in HERE.glob("test_*.py")}
    if {t["file"] for t in record} != on_disk:
        pytest.skip("needs every test file collected")
    assert set(ALL_REAL) <= on_disk
    without = sorted(on_disk - set(ALL_REAL) - {t["file"] for t in record if _fast(t)})
    assert not without, f"no test of these files is in the fast tier (-m {FAST_TIER!r}): {without}"


def test_fast_tier_has_cr1_exactness_for_every_family(record):
    exact = [t for t in record if t["file"] == "test_exactness.py"]
    if not exact:
        pytest.skip("tests/test_exactness.py not collected")
    families = {t["params"].get("name") for t in exact if _fast(t)}
    assert set(BUILDERS) <= families, f"families without a fast exactness test: {sorted(set(BUILDERS) - families)}"


def test_the_script_runs_this_tier():
    assert f'"{FAST_TIER}"' in (HERE.parent / "scripts" / "test.sh").read_text()
