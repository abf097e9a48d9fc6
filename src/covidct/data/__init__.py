"""Datasets, splits and transforms for the layouts documented in the README."""

from covidct.data.classification import (
    BINARY_CLASSES, THREE_CLASSES, ClsRecord, canonical_label, detect_layout, load_records,
)
from covidct.data.paths import ENV_VAR, data_root
from covidct.data.segmentation import LESION_CLASSES, LESION_COLOURS, SegFolder, SegSample
from covidct.data.splits import group_kfold, group_split

__all__ = [
    "BINARY_CLASSES", "ENV_VAR", "LESION_CLASSES", "LESION_COLOURS", "THREE_CLASSES", "ClsRecord",
    "SegFolder", "SegSample", "canonical_label", "data_root", "detect_layout", "group_kfold", "group_split", "load_records",
]
