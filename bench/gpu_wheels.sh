#!/usr/bin/env bash
# Run HERE (a machine with pip and a package registry), not on the device machine: gathers, as wheels for CPython
# 3.12 on x86-64 Linux, everything bench/gpu_check.py needs that the device image lacks (the image has torch 2.11,
# numpy, scipy, scikit-image, pandas, timm, ... but not nnunetv2 and its helpers, SimpleITK, cc3d, slicerio, nibabel,
# blosc2 or monai; see bench/GPU.md), plus this project itself as a wheel.
#
# The device tool carries at most 64 MiB per call (working tree included), and SimpleITK's wheel alone is ~53 MB,
# so the wheels go into two folders, each under the limit, carried by two back-to-back calls:
#   .gpu-wheels/a : SimpleITK alone
#   .gpu-wheels/b : everything else
# (the first call installs a/ under /tmp on the device, which stays while the machine is warm; see bench/GPU.md).
#
# Usage: bench/gpu_wheels.sh [OUT_DIR]     (default .gpu-wheels, ignored by git; never commit wheels)
# Versions are the ones `make setup` installs here (pyproject.toml, constraints.txt), so the device runs the code
# that the test suite runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpu-wheels}
PY=${PY:-.venv/bin/python}
LIMIT=$((60 * 1024 * 1024))   # per folder: 64 MiB less room for the working tree that travels with it
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf "$OUT"
mkdir -p "$OUT/a" "$OUT/b" "$OUT/sdist"

# a/: SimpleITK (binary, ~53 MB)
$PY -m pip download -q --no-deps "${TARGET[@]}" -d "$OUT/a" "SimpleITK==2.5.7"

# b/: compiled packages as cp312 manylinux wheels
$PY -m pip download -q --no-deps "${TARGET[@]}" -d "$OUT/b" \
    "connected-components-3d==4.1.1" "blosc2==4.14.1" "numexpr==2.14.2" "ndindex==1.10.1" \
    "pydantic-core==2.50.5"

# b/: pure-Python packages (some are sdists only, e.g. acvl-utils): built into py3-none-any wheels here
$PY -m pip wheel -q --no-deps -w "$OUT/b" \
    "nnunetv2==2.8.1" "dynamic-network-architectures==0.4.4" "acvl-utils==0.2.6" \
    "batchgenerators==0.25.5" "batchgeneratorsv2==0.3.6" "slicerio==1.4.0" "pynrrd==1.1.3" "nibabel==5.4.2" \
    "monai==1.6.1" "yacs==0.1.8" "graphviz==0.21" "future==1.0.0" "pydantic==2.14.4" "annotated-types" \
    "typing-inspection" "h2" "hpack" "hyperframe"
# b/: this project (its tests and benches travel with the working tree; the wheel is the installed library)
$PY -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/b" .
rm -rf "$OUT/sdist"

# Every wheel must be for any Python or for CPython 3.12 on x86-64 Linux
bad=$(find "$OUT" -name '*.whl' ! -name '*-py3-none-any.whl' ! -name '*-py2.py3-none-any.whl' \
      ! -name '*-cp312-cp312-*manylinux*x86_64*.whl' ! -name '*-cp3[0-9]*-abi3-*manylinux*x86_64*.whl' || true)
if [ -n "$bad" ]; then echo "error: wheels not for CPython 3.12 x86-64: $bad" >&2; exit 1; fi

# One version of each distribution (two stop the whole install on the device)
dups=$(find "$OUT" -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
if [ -n "$dups" ]; then echo "error: more than one wheel of: $dups" >&2; exit 1; fi

# Requirements that neither these wheels nor the device image provide (the image's list: KINDS.md)
KINDS=${KINDS:-/work/.library/device/KINDS.md}
if [ -f "$KINDS" ]; then
    $PY - "$OUT" "$KINDS" <<'EOF'
import re, sys, zipfile
from pathlib import Path

out, kinds = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
listed = kinds.split("Packages:", 1)[1].split("\n", 1)[0] if "Packages:" in kinds else ""
have = {norm(n.strip(" .")) for n in listed.split(",") if n.strip(" .")}
wheels = sorted(out.glob("*/*.whl"))
have |= {norm(w.name.split("-")[0]) for w in wheels}
# needed only by code paths the check never takes (training, tiff reading, network plots): left out on purpose
unused = {"imagecodecs", "unittest2", "torch"}
missing = {}
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        for line in archive.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:") or "extra ==" in line or "python_version < '3.12'" in line \
                    or 'python_version < "3.12"' in line or 'platform_machine == "wasm32"' in line:
                continue
            name = norm(re.match(r"Requires-Dist:\s*([A-Za-z0-9_.\-]+)", line).group(1))
            if name not in have and name not in unused:
                missing.setdefault(name, []).append(wheel.name.split("-")[0])
if missing:
    sys.exit("error: requirements in neither the wheels nor the device image: "
             + "; ".join(f"{k} (for {', '.join(v)})" for k, v in sorted(missing.items())))
print(f"requirements: all {len(wheels)} wheels' needs are in the wheels or the device image "
      f"(left out, unused by the check: {', '.join(sorted(unused))})")
EOF
fi

for part in a b; do
    size=$(du -sb "$OUT/$part" | cut -f1)
    echo "$OUT/$part: $(ls "$OUT/$part" | wc -l) wheels, $((size / 1024 / 1024)) MiB"
    if [ "$size" -gt "$LIMIT" ]; then echo "error: $OUT/$part is over $((LIMIT / 1024 / 1024)) MiB" >&2; exit 1; fi
done
