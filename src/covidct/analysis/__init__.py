"""Scan-level analysis: lungs, lesion burden, severity."""
