"""Fuzz every parser of outside input for longer than the unit tests do.

For each format (spool entry, datagram, state file, audit line, history line,
config file) Hypothesis draws --examples inputs (valid records with one field
replaced by any JSON value, a poison number, a deep nest, a dropped or an
extra key; raw bytes; cut-off records; TOML built from the config's own keys
with bad values) and checks that the parser answers within the time bound
with a usable value or its format's error (tests/fuzz_inputs.py). A failing
input is shrunk and kept as tests/data/bad_inputs/<format>/found-<hash>.bin,
which tests/test_fuzz_inputs.py then replays on every run.

Run:  .venv/bin/python benchmarks/fuzz_inputs.py [--examples N] [--format NAME ...]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_inputs import BAD_INPUTS, FORMATS, check, inputs


def fuzz(fmt: str, examples: int) -> tuple[int, str | None]:
    """Run ``examples`` inputs of ``fmt``; returns (inputs tried, problem or None)."""
    tried = [0]
    found: list[tuple[bytes, str]] = []

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        raw = data.draw(inputs(fmt))
        tried[0] += 1
        problem = check(fmt, raw)
        if problem is not None:
            found.append((raw, problem))
            raise AssertionError(problem)

    try:
        run()
    except AssertionError:
        raw, problem = found[-1]          # the shrunk example is the last one that failed
        kept = BAD_INPUTS / fmt / f"found-{hashlib.sha256(raw).hexdigest()[:12]}.bin"
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_bytes(raw)
        return tried[0], f"{problem} (kept as {kept})"
    return tried[0], None


def main() -> int:
    from benchmarks.common import machine
    print(machine())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="inputs per format")
    parser.add_argument("--format", action="append", choices=sorted(FORMATS))
    args = parser.parse_args()
    failed = 0
    for fmt in args.format or sorted(FORMATS):
        started = time.monotonic()
        tried, problem = fuzz(fmt, args.examples)
        took = time.monotonic() - started
        print(f"{fmt:<9} {tried:>7} inputs in {took:6.1f} s: {problem or 'all answered'}")
        failed += problem is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
