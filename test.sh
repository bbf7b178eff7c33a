#!/usr/bin/env bash
# Installs what the tests need, runs the linter (ruff, configured in pyproject.toml), then the whole suite (slow
# end-to-end tests included).
# Extra arguments go to pytest, e.g. `bash test.sh -m "not slow"` for the fast part only.
set -euo pipefail
cd "$(dirname "$0")"
bash tools/setup_env.sh
echo "[lint] ruff check ."
python3 -m ruff check .
set +e
python3 -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
