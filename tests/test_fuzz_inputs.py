"""Every parser of outside input, fuzzed (bounded here; benchmarks/fuzz_inputs.py runs
longer) and checked against the regression cases kept in tests/data/bad_inputs/."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_inputs import FORMATS, check, inputs, regression_files


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_parser_answers_with_a_value_or_its_error(fmt: str, data: st.DataObject) -> None:
    raw = data.draw(inputs(fmt))
    problem = check(fmt, raw)
    assert problem is None, f"{fmt}: {problem} for {raw[:200]!r}"


def test_regression_cases_exist_for_every_format() -> None:
    kept = {fmt for fmt, _ in regression_files()}
    assert kept == set(FORMATS)


@pytest.mark.parametrize(("fmt", "path"), regression_files(),
                         ids=[f"{f}/{p.name}" for f, p in regression_files()])
def test_kept_bad_input_is_refused_clearly(fmt: str, path: Path) -> None:
    assert check(fmt, path.read_bytes()) is None
    # and each is refused, not accepted: these are the bad inputs found so far
    with pytest.raises(FORMATS[fmt].error):
        FORMATS[fmt].use(path.read_bytes())
