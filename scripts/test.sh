#!/usr/bin/env bash
# Run the test suite (installs cxrkit into .venv first if needed). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
python -m pytest -q -ra "$@"
