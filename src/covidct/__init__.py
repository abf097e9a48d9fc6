"""covidct: analysis of COVID-19 chest CT (research software, not for diagnosis)."""

from __future__ import annotations

__version__ = "0.1.0"

DISCLAIMER = (
    "Research software, not for diagnosis: covidct is not a medical device and must not be used "
    "for diagnosis or treatment decisions."
)

__all__ = ["DISCLAIMER", "__version__"]
