#!/usr/bin/env bash
# Installs what the tests need into .venv (Python 3.11) and runs the whole suite.
# Used as-is by README's test command and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# the end-to-end browser test drives Debian's chromium (a test tool's own browser download fails offline)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
            || echo "warning: could not install chromium; the browser test will be skipped" >&2
    else
        echo "note: chromium/chromedriver missing; install them (apt-get install chromium chromium-driver) for the browser test" >&2
    fi
fi
# --quick: the day-to-day loop, without the browser, cluster and classroom tests (CI runs everything)
if [ "${1:-}" = "--quick" ]; then
    shift
    set -- -m "not slow" "$@"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
