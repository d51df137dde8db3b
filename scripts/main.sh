#!/usr/bin/env bash
# The main job: train the default normal-vs-pneumonia recipe on the Kermany chest X-rays and evaluate it on the
# patient-grouped held-out test split. Needs CXR_DATA_DIR (folder holding chest_xray/) and ImageNet weights
# (CXR_WEIGHTS_DIR, or internet). Extra arguments go to `cxr train`, e.g. --set stages.0.epochs=1
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO"
run="$(cxr train recipes/pneumonia-mobilenetv2.yaml "$@" | tail -n 1)"
cxr evaluate "$run" --split test
