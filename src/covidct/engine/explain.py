"""Class activation maps for covidct classifiers (pytorch-grad-cam), and weak lesion masks from them.

Methods: ``gradcam`` (Grad-CAM; with a global-average-pooling + linear head it is the CAM of Zhou et
al. up to the ReLU and the normalisation), ``gradcam++`` and ``layercam``. The target layer is the
last feature map of the backbone (EfficientNet: ``bn2``; ResNet: ``layer4``). An ensemble's map is the
mean of its CNN members' maps (each scaled to ``[0, 1]`` first; with the ensemble's mirror test-time
augmentation each member's map is itself the mean over the image and its mirror image); its Mask-Net
members read RoIs, not a feature map, and add no map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from covidct.io.window import PRESETS
from covidct.models.classification import ClassificationNet
from covidct.models.ensemble import ClassifierEnsemble

METHODS = ("gradcam", "gradcam++", "layercam")


def target_layer(model: ClassificationNet) -> torch.nn.Module:
    net = model.net
    for name in ("bn2", "layer4", "conv_head"):
        if hasattr(net, name):
            return getattr(net, name)
    raise ValueError(f"no known last feature layer in {type(net).__name__}")


def cam_members(model: ClassificationNet | ClassifierEnsemble) -> list[ClassificationNet]:
    """The CNN classifiers whose maps make ``model``'s: itself, or an ensemble's CNN members
    (``ValueError`` when there is none)."""
    members = list(model.members) if isinstance(model, ClassifierEnsemble) else [model]
    cnn = [m for m in members if isinstance(m, ClassificationNet)]
    if not cnn:
        raise ValueError("no CNN classifier to draw a class activation map from (Mask-Net classifiers read RoIs)")
    return cnn


def class_activation_map(model: ClassificationNet | ClassifierEnsemble, image01: np.ndarray, *,
                         class_index: int | None = None, method: str = "gradcam") -> tuple[np.ndarray, np.ndarray]:
    """``(cam, probabilities)``: ``cam`` in ``[0, 1]`` on the image's own grid for ``class_index``
    (default: the positive / last class); for an ensemble the mean of its CNN members' maps (module
    docstring) and the ensemble's calibrated probabilities."""
    image01 = np.asarray(image01, np.float32)
    heat = activation_map(model, image01, class_index=class_index, method=method)
    size = model.config.input_size
    x = F.interpolate(torch.as_tensor(image01)[None, None], size=(size, size), mode="bilinear", align_corners=False)
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0].numpy()
    return heat, probs


def activation_map(model: ClassificationNet | ClassifierEnsemble, image01: np.ndarray, *,
                   class_index: int | None = None, method: str = "gradcam") -> np.ndarray:
    """The map of :func:`class_activation_map` alone (no forward pass for the probabilities: for an
    ensemble that pass runs every member, Mask-Net ones included)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    image01 = np.asarray(image01, np.float32)
    index = len(model.config.classes) - 1 if class_index is None else class_index
    if not isinstance(model, ClassifierEnsemble):
        return _cnn_map(model, image01, index, method)
    mirrored = np.ascontiguousarray(image01[:, ::-1])
    maps = []
    for member in cam_members(model):
        heat = _cnn_map(member, image01, index, method)
        if model.config.tta:
            heat = (heat + _cnn_map(member, mirrored, index, method)[:, ::-1]) / 2
        maps.append(heat)
    heat = np.mean(maps, axis=0)
    return (heat / heat.max() if heat.max() > 0 else heat).astype(np.float32)


def _cnn_map(model: ClassificationNet, image01: np.ndarray, index: int, method: str) -> np.ndarray:
    """One CNN's map for class ``index`` on the image's own grid, scaled to ``[0, 1]``."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}[method]
    size = model.config.input_size
    x = F.interpolate(torch.as_tensor(image01)[None, None], size=(size, size), mode="bilinear", align_corners=False)
    model.eval()
    with cls(model=model, target_layers=[target_layer(model)]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(index)])[0]
    heat = F.interpolate(torch.as_tensor(heat)[None, None], size=image01.shape, mode="bilinear", align_corners=False)[0, 0]
    heat = heat.numpy()
    if heat.max() > 0:
        heat = heat / heat.max()
    return heat.astype(np.float32)


#: Lower bound of ground-glass attenuation, -700 HU, in model-input units (``model`` window): lung
#: above it is denser than aerated lung. Fixed a priori (a usual quantitative-CT cut), not fitted.
GGO_FLOOR_HU = -700.0
GGO_FLOOR = (GGO_FLOOR_HU - PRESETS["model"].low) / PRESETS["model"].width
#: Smoothing (pixels) of the image before the density test.
DENSITY_SIGMA_PX = 2.0


def cam_to_mask(cam: np.ndarray, *, threshold: float = 0.5, region: np.ndarray | None = None,
                image01: np.ndarray | None = None) -> np.ndarray:
    """A weak lesion mask: CAM at or above ``threshold`` (relative to its maximum), kept inside
    ``region`` (e.g. the lung) when given; with ``image01`` (the model input) refined to the pixels
    denser than aerated lung (smoothed input >= :data:`GGO_FLOOR`, i.e. -700 HU)."""
    mask = cam >= threshold
    if region is not None:
        mask &= region.astype(bool)
    if image01 is not None:
        from scipy import ndimage

        mask &= ndimage.gaussian_filter(np.asarray(image01, np.float32), DENSITY_SIGMA_PX) >= GGO_FLOOR
    return mask


def evaluate_weak_masks(model: ClassificationNet | ClassifierEnsemble, folder, *, threshold: float = 0.5,
                        method: str = "gradcam", density: bool = False, progress: bool = True) -> dict:
    """Score CAM-derived infection masks against a COVID-SemiSeg-layout folder with the
    segmentation metrics (pooled and per image). The reference lung field (``lung/``) is used as
    the region when present; ``density`` refines the masks to pixels above -700 HU
    (:func:`cam_to_mask`); with ``threshold=0`` that density prior alone is scored (no CAM)."""
    from tqdm import tqdm

    from covidct.io.window import to_model_input
    from covidct.metrics.segmentation import SegmentationMetrics

    metrics = SegmentationMetrics(compute_hd95=True)
    for i in tqdm(range(len(folder)), desc="weak masks", unit="slice", disable=not progress):
        s = folder[i]
        grey = to_model_input(s.image, is_hu=False)
        cam = activation_map(model, grey, method=method)
        pred = cam_to_mask(cam, threshold=threshold, region=s.lung, image01=grey if density else None)
        truth = np.isin(s.labels, (1, 2))
        metrics.update("infection", pred, truth, prob=cam, image_id=s.id)
        metrics.update_labels(pred.astype(np.uint8), truth.astype(np.uint8))
    agg = metrics.aggregate()
    return {"n_images": len(folder), "threshold": threshold, "method": method, "density": density,
            "dice": {"infection": agg["pooled"]["infection"]["dice"]},
            "dice_mean_per_image": {"infection": agg["mean_per_image"]["infection"]["dice"]},
            "iou": {"infection": agg["pooled"]["infection"]["iou"]}, "rand_error": agg["rand_error"],
            "details": {"pooled": agg["pooled"], "mean_per_image": agg["mean_per_image"]}}


def maskcls_evidence(model, image01: np.ndarray, *, temperature: float = 1.0,
                     min_score: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a Mask-Net classifier decides from: ``(boxes, scores, probabilities)`` — the RoIs of its
    N x 5 input that score at least ``min_score`` (boxes ``x0, y0, x1, y1`` on the image's own grid) and
    its calibrated class probabilities. The image goes in exactly as ``evaluate cls`` feeds it."""
    from covidct.data.cls_transforms import cls_eval_transform

    x = cls_eval_transform(model.config.input_size)(image=np.asarray(image01, np.float32))["image"]
    model.eval()
    with torch.inference_mode():
        s_in = model.s_input([torch.from_numpy(np.ascontiguousarray(x))[None]])
        probs = torch.softmax(model.classify(s_in) / temperature, dim=1)[0].numpy()
    cfg = model.config
    rois = s_in[0, : cfg.top_n * cfg.roi_width].reshape(cfg.top_n, cfg.roi_width).numpy()
    keep = rois[:, 4] >= min_score
    h, w = image01.shape[-2:]
    boxes = rois[keep, :4] * np.array([w, h, w, h], np.float32)
    return boxes, rois[keep, 4], probs
