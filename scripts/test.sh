#!/usr/bin/env bash
# Set up .venv (see setup.sh), type-check the package (mypy, configured in pyproject.toml) and run the tests.
#   bash scripts/test.sh [pytest args]        every test (CI runs this)
#   bash scripts/test.sh fast [pytest args]   the fast tier: neither slow nor on real weights (tests/conftest.py)
set -euo pipefail
cd "$(dirname "$0")/.."
tier=()
if [ "${1:-}" = fast ]; then
  shift
  tier=(-m "not slow and not real")  # a later -m in the arguments replaces it
fi
bash scripts/setup.sh
echo "mypy: type-checking prism_edge ..." >&2
.venv/bin/python -m mypy || { echo "mypy found type errors (above)" >&2; exit 1; }
set +e
.venv/bin/python -m pytest -q --durations=15 ${tier[@]+"${tier[@]}"} "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$rc"
