#!/usr/bin/env bash
# Install (if needed) and run the whole test suite. Real-data tests use $COVIDCT_DATA
# (default ../shared/data) and are skipped when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MPLBACKEND=Agg
exec .venv/bin/python -m pytest -q "$@"
