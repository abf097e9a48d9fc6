#!/usr/bin/env bash
# Create .venv and install covidct with its pinned PyTorch pair. Idempotent: re-runs only when
# pyproject.toml changed. torch 2.14.1 + torchvision 0.29.1 come from this machine's wheel store
# (pip's configured find-links / local index); their compiled ops (nms, roi_align) load.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.covidct-install-$(sha256sum pyproject.toml | cut -c1-16)
js_deps() {   # jsdom (npm) for the test that runs the viewer's JavaScript; without npm that test skips
  if [ ! -d .venv/js/node_modules/jsdom ] && command -v npm >/dev/null 2>&1; then
    echo "[install] jsdom for the viewer's JavaScript test"
    rm -rf .venv/js.partial   # installed aside, then moved: a cut-off install never looks complete
    if timeout 180 npm install --silent --no-audit --no-fund --prefix .venv/js.partial jsdom@24 >/dev/null 2>&1; then
      rm -rf .venv/js && mv .venv/js.partial .venv/js
    else
      rm -rf .venv/js.partial
      echo "[install] warning: npm could not install jsdom; the viewer JavaScript test will skip"
    fi
  fi
}
if [ -f "$stamp" ]; then
  js_deps
  exit 0
fi
echo "[install] creating .venv with $($PY --version)"
"$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
echo "[install] torch==2.14.1 torchvision==0.29.1 (about 100 s)"
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
echo "[install] covidct and its dependencies"
.venv/bin/python -m pip install --quiet -e '.[test,imagenet]'
rm -f .venv/.covidct-install-*
touch "$stamp"
js_deps
.venv/bin/python - <<'PY'
import torch, torchvision
from torchvision.ops import nms
nms(torch.rand(4, 4).cumsum(1), torch.rand(4), 0.5)
print(f"[install] ok: torch {torch.__version__}, torchvision {torchvision.__version__} (ops load)")
PY
