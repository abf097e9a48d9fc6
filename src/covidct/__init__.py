"""covidct: analysis of COVID-19 chest CT (research software, not for diagnosis)."""

from __future__ import annotations

__version__ = "0.1.0"

DISCLAIMER = (
    "Research software, not for diagnosis: covidct is not a medical device and must not be used "
    "for diagnosis or treatment decisions."
)
#: The disclaimer where a format allows only a short text (NIfTI's 80-byte ``descrip``).
SHORT_DISCLAIMER = "covidct: research software, not for diagnosis"
#: Text entries of every image file covidct writes (PNG text chunks).
IMAGE_METADATA = {"Software": f"covidct {__version__}", "Disclaimer": DISCLAIMER}

__all__ = ["DISCLAIMER", "IMAGE_METADATA", "SHORT_DISCLAIMER", "__version__"]
