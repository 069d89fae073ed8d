#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up this Debian 12 host (packages,
# venv, libvirtd, guest image), then lint (ruff), type-check (mypy), check the
# import contracts (lint-imports, pyproject.toml), and run the unit tests and
# the real-hypervisor integration tests (pytest).
# Extra arguments go to pytest (e.g. -k NAME, -x).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/integration/setup.sh"
cd "$REPO"
echo "test: ruff"
.venv/bin/ruff check vmshare hooks integration tests benchmarks
echo "test: mypy"
# everything, strict: each fake in tests/fakes is checked against the Protocol
# it stands in for, every test, integration test, benchmark and the hook against
# the API it calls (integration/ and benchmarks/ are plain directories imported
# from the checkout's root: hence --explicit-package-bases)
.venv/bin/mypy --explicit-package-bases vmshare tests integration benchmarks hooks
echo "test: import contracts"
.venv/bin/lint-imports --no-cache --no-logo
echo "test: pytest"
exec .venv/bin/pytest -p no:cacheprovider "$@"
