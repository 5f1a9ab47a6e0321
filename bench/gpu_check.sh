#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (bench/GPU.md gives the two `run` calls): installs the wheels that bench/gpu_wheels.sh
# gathered here into /tmp/site (beside the image's own torch 2.11, numpy, scipy, ...; --no-deps, nothing fetched),
# then runs the GPU check into $OUT/gpu-check.
#   bench/gpu_check.sh install-a   first call: carries .gpu-wheels/a (SimpleITK), installs it, returns
#   bench/gpu_check.sh run         second call, same warm machine: carries .gpu-wheels/b, installs it, runs the check
# /tmp/site stays between calls while the machine is warm (30 s); a fresh machine needs install-a again.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/site
install() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$1"/*.whl
}
case "${1:-run}" in
    install-a)
        install .gpu-wheels/a || exit 1
        echo "installed: $(ls .gpu-wheels/a)" ;;
    run)
        [ -d "$SITE/SimpleITK" ] || { echo "error: $SITE has no SimpleITK: the machine is fresh; run 'bench/gpu_check.sh install-a' with .gpu-wheels/a carried first" >&2; exit 1; }
        install .gpu-wheels/b || exit 1
        export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
        python3 -c "import torch, nnunetv2, SimpleITK, cc3d, slicerio, monai, blosc2, BraTSEnsembleLib.pipeline as p; print('imports ok: torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'brats-ensemble from', p.__file__)" || exit 1
        mkdir -p "${OUT:-/tmp/out}/gpu-check"
        python3 bench/gpu_check.py --device cuda --out "${OUT:-/tmp/out}/gpu-check" "${@:2}" 2>&1 | tee "${OUT:-/tmp/out}/gpu-check/log.txt"
        exit "${PIPESTATUS[0]}" ;;
    *) echo "usage: bench/gpu_check.sh install-a|run [gpu_check.py options]" >&2; exit 2 ;;
esac
