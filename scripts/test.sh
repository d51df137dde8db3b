#!/usr/bin/env bash
# Run the test suite (installs cxrkit into .venv first if needed). Extra arguments go to pytest.
# Test files run in parallel processes (pytest-xdist; a file's tests stay in one process, so its module fixtures are
# built once): one per core, at most 4 and one per 6 GiB of memory (a process can peak at 5 GiB).
# CXR_TEST_WORKERS=1 runs them in this process, e.g. to see their output with -s.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
WORKERS="${CXR_TEST_WORKERS:-$(python -c 'import os
memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
print(max(1, min(4, len(os.sched_getaffinity(0)), int(memory_gib // 6))))')}"
PARALLEL=()
if [ "$WORKERS" -gt 1 ]; then
  PARALLEL=(-n "$WORKERS" --dist loadfile)
fi
python -m pytest -q -ra ${PARALLEL[@]+"${PARALLEL[@]}"} "$@"
