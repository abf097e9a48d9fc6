#!/usr/bin/env bash
# Install (if needed) and run the main job on the default input: the real COVID-CT-MD series
# P001 when the data folder has it, else a generated phantom series. Results go to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MPLBACKEND=Agg
DATA=${COVIDCT_DATA:-../shared/data}
OUT=${1:-out/demo}
INPUT="$DATA/covid-ct-md/P001"
if [ ! -d "$INPUT" ]; then
  INPUT=out/phantom-series
  echo "[demo] $DATA/covid-ct-md/P001 not found: using a generated phantom series in $INPUT"
  .venv/bin/python -c "from covidct.data.synthetic import phantom_hu, write_ct_series; write_ct_series(__import__('pathlib').Path('$INPUT'), phantom_hu(24, 256))"
fi
.venv/bin/covidct info "$INPUT"
.venv/bin/covidct analyze "$INPUT" -o "$OUT"
echo "[demo] open $OUT/report.html or $OUT/viewer.html in a browser, or: .venv/bin/covidct serve $OUT"
