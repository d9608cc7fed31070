#!/usr/bin/env bash
# Set up .venv (see setup.sh), type-check the package (mypy, configured in pyproject.toml) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "mypy: type-checking prism_edge ..." >&2
.venv/bin/python -m mypy || { echo "mypy found type errors (above)" >&2; exit 1; }
set +e
.venv/bin/python -m pytest -q --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$rc"
