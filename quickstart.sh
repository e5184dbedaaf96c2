#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (reused when present), then runs a job.
#   ./quickstart.sh demo [args]   the main job (nanobeam demo)
#   ./quickstart.sh test [args]   lint, type check, layer check, then the test suite
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    echo "quickstart: creating .venv with $python"
    "$python" -m venv .venv
fi
# Reinstall only when the package definition or the pins change.
stamp=.venv/.nanobeam-install-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "quickstart: installing nanobeam_bluesky into .venv (torch pinned by constraints.txt)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,databroker]"
    echo "$want" > "$stamp"
fi

job=${1:-demo}
[ $# -gt 0 ] && shift
case "$job" in
    demo) exec .venv/bin/nanobeam demo "$@" ;;
    test)
        .venv/bin/ruff check nanobeam_bluesky tests benchmarks docs/*.py
        .venv/bin/ruff format --check nanobeam_bluesky tests benchmarks docs/*.py
        .venv/bin/mypy nanobeam_bluesky      # [tool.mypy] in pyproject.toml
        .venv/bin/lint-imports               # the layers, [tool.importlinter] in pyproject.toml
        exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: ./quickstart.sh demo|test [args]" >&2; exit 2 ;;
esac
