"""The single source of truth for every evaluation in covidct."""

from covidct.metrics.classification import (
    MEASURES, ClassificationReport, bootstrap_ci, classification_report, confusion_matrix,
    measures_from_counts, parse_confusion, roc_auc, roc_auc_per_class,
)
from covidct.metrics.instances import InstanceAP
from covidct.metrics.plots import plot_confusion, save_figure
from covidct.metrics.segmentation import SegmentationMetrics, dice_score, hausdorff95, rand_error

__all__ = [
    "MEASURES", "ClassificationReport", "InstanceAP", "SegmentationMetrics", "bootstrap_ci", "classification_report",
    "confusion_matrix", "dice_score", "hausdorff95", "measures_from_counts", "parse_confusion",
    "plot_confusion", "rand_error", "roc_auc", "roc_auc_per_class", "save_figure",
]
