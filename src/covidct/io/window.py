"""Hounsfield-unit windowing and the conversion to model input.

Model input convention (used by every model in covidct): one channel, float32 in ``[0, 1]``.

* HU sources are windowed with the **model** preset (level -420, width 1480): ``-1160 HU -> 0``,
  ``320 HU -> 1``, clipped. It is the window under which HU volumes look like the 8-bit training
  slices (COVID-SemiSeg JPGs, whose window is not documented): a least-squares fit of the
  5th..95th intensity percentiles around the lungs of the 50 training slices against the HU
  percentiles of the same region in the three open COVID-CT-MD scans gave level -380 / -450 / -429
  and width 1493 / 1477 / 1469 (no labels used; ``benchmarks/window_fit.py``); healthy lung (about -850 HU) then maps to 0.21 and
  chest-wall muscle (+25 HU) to 0.81, as in the JPGs (0.21 and 0.81). The familiar **lung** preset
  (-600 / 1500) maps healthy lung to 0.33, where the training slices have ground-glass opacity.
* 8-bit images are divided by 255; images of other depth are scaled by their 0.5 / 99.5
  percentiles (their window is unknown).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """A display window: ``level`` (centre) and ``width`` in HU."""

    level: float
    width: float

    @property
    def low(self) -> float:
        return self.level - self.width / 2.0

    @property
    def high(self) -> float:
        return self.level + self.width / 2.0


PRESETS: dict[str, Window] = {
    "model": Window(level=-420.0, width=1480.0),
    "lung": Window(level=-600.0, width=1500.0),
    "mediastinum": Window(level=50.0, width=350.0),
}


def get_window(spec: str | Window) -> Window:
    """A preset name (``model``, ``lung``, ``mediastinum``), ``"L,W"`` (e.g. ``"-600,1500"``) or a Window."""
    if isinstance(spec, Window):
        return spec
    if spec in PRESETS:
        return PRESETS[spec]
    try:   # "=L,W" too: the form of ``--window=L,W`` typed with a space after the option
        level, width = (float(v) for v in spec.removeprefix("=").split(","))
    except ValueError as exc:
        raise ValueError(f"window {spec!r}: use a preset {sorted(PRESETS)} or 'LEVEL,WIDTH'") from exc
    if width <= 0:
        raise ValueError(f"window {spec!r}: width must be positive")
    return Window(level=level, width=width)


def apply_window(hu: np.ndarray, window: str | Window = "lung") -> np.ndarray:
    """Map HU to ``[0, 1]`` float32 through a window (values outside are clipped)."""
    w = get_window(window)
    out = (np.asarray(hu, dtype=np.float32) - w.low) / (w.high - w.low)
    return np.clip(out, 0.0, 1.0, out=out)


def to_model_input(array: np.ndarray, *, is_hu: bool, window: str | Window = "model") -> np.ndarray:
    """Bring a slice or volume to the model input range ``[0, 1]`` (see module docstring)."""
    array = np.asarray(array, dtype=np.float32)
    if is_hu:
        return apply_window(array, window)
    vmin, vmax = float(array.min()), float(array.max())
    if vmin >= 0.0 and vmax <= 255.0:
        return array / 255.0
    lo, hi = (float(v) for v in np.percentile(array, [0.5, 99.5]))
    if hi <= lo:
        return np.zeros_like(array)
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32, copy=False)
