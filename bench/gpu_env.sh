#!/usr/bin/env bash
# Source on a GPU machine whose image has torch but not this package: installs the carried
# wheels (.whl/, from ../shared/tools/device-wheels.sh) and u2moe itself into /tmp/site.
# Commands may run from anywhere, the repository root included.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . \
  || return 1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
