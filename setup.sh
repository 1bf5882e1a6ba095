#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtualenv in .venv with u2moe installed (editable) and
# the test tools. Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch 2.11 declares setuptools<82; older pips cannot build an editable PEP 660 install.
.venv/bin/python -m pip install -q --upgrade "pip>=24" "setuptools>=68,<82" wheel
.venv/bin/python -m pip install -q -e '.[dev]'
