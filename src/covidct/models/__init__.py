"""Networks, their encoders, self-describing checkpoints and the shipped-model registry."""

from covidct.models.checkpoint import file_sha256, read_checkpoint, save_checkpoint
from covidct.models.encoders import ENCODERS, OFFLINE_IMAGENET
from covidct.models.registry import WEIGHTS_DIR, list_models, load_seg_model, model_entry, resolve_model
from covidct.models.segmentation import SegModelConfig, SegmentationNet, build_seg_model

__all__ = [
    "ENCODERS", "OFFLINE_IMAGENET", "WEIGHTS_DIR", "SegModelConfig", "SegmentationNet", "build_seg_model",
    "file_sha256", "list_models", "load_seg_model", "model_entry", "read_checkpoint", "resolve_model", "save_checkpoint",
]
