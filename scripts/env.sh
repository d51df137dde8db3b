# Sourced by the scripts: a virtualenv with cxrkit installed, and the data/weights folders found beside the repo.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CXR_VENV:-$REPO/.venv}"
# Reinstall when pyproject.toml changed since the last install (new dependencies), not only when the venv is missing.
STAMP="$VENV/.cxrkit-pyproject.sha256"
WANT="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/cxr" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] \
  || ! "$VENV/bin/python" -c "import cxrkit, torchvision, timm" 2>/dev/null; then
  echo "installing cxrkit into $VENV (PyTorch is a large download the first time)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -e "$REPO[dev]"
  echo "$WANT" >"$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# Real data and ImageNet weights for development and CI live in ../shared; users point these at their own copies.
SHARED="${CXR_SHARED:-$REPO/../shared}"
if [ -d "$SHARED" ]; then
  export CXR_SHARED="$(cd "$SHARED" && pwd)"
  export CXR_DATA_DIR="${CXR_DATA_DIR:-$CXR_SHARED/data}"
  export CXR_WEIGHTS_DIR="${CXR_WEIGHTS_DIR:-$CXR_SHARED/weights}"
fi
