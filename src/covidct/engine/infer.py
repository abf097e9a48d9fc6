"""Slice inference for the segmentation network: resize to the model's input, run in batches,
bring the logits back to each slice's own size.

The training slices (COVID-SemiSeg) are cropped to the lungs. A slice framed otherwise (a full CT
slice, a 512² MedSeg frame) is segmented in two passes when the model has a lung head: the first
pass finds the lungs, and if their box (+3 %) covers less than :data:`~covidct.data.segmentation.CROP_MAX_FRACTION` of the slice,
the second pass segments that box and its labels are pasted back (out of fold on the MedSeg frames:
infection Dice 0.714 -> 0.734, consolidation 0.443 -> 0.485; lung-cropped slices are unchanged).

GGO or consolidation: the network decides *where* the lesions are (GGO + consolidation), the density
of each lesion pixel decides *which*: a lesion pixel whose input, smoothed with a Gaussian of
:data:`DENSITY_SIGMA_PX` pixels (:data:`DENSITY_SIGMA_MM` on slices of known pixel size), is at least
:data:`CONSOLIDATION_LEVEL` is consolidation, else GGO. In HU
through the ``model`` window that level is -1160 + 0.55 x 1480 = -346 HU, near the usual
GGO / consolidation boundary. Chosen on the 5-fold out-of-fold predictions of the training slices
(nested: chosen on 4 folds, scored on the 5th, pooled: GGO 0.615 -> 0.616, consolidation 0.454 -> 0.498;
``benchmarks/RESULTS.md``); ``density_classes=False`` keeps the network's own split.

Pleural effusion: when the model carries an ``effusion`` companion (a network with an effusion output stored
in its checkpoint, :func:`covidct.models.checkpoint.attach_companion`), that network runs once per slice on
the main network's final input (the lung crop when the second pass runs) and decides effusion alone: a
pixel is effusion where the companion's effusion
probability ``e`` is at least 0.5, otherwise it takes the main network's most likely class among the
others; the probabilities are the main network's (effusion removed, renormalised) times ``1 - e``, and
``e`` for effusion.

Lung-masked slices: when the model carries a ``lung_masked`` companion (a network trained on slices blacked
out outside their lung field, like MedSeg's 512² frames), a slice that the main network's lung head finds
blacked out outside its lungs (:func:`~covidct.data.segmentation.is_lung_masked`) is segmented by that
network instead: once, on the box of the lungs the main network found when
the slice is framed wider than them (as the second pass cuts), else on the whole slice; the density split
follows. ``SegPrediction.network`` says which network ran.
Out of fold on the MedSeg frames the crop-trained network scores infection Dice 0.73, a network that also
trained on frames 0.79 (``benchmarks/RESULTS.md``). The effusion companion does not run on such slices:
pleural effusion lies outside the lung field, which these renderings black out (of the 19,786 effusion
pixels of the MedSeg frames, 19,777 are black), so only the lung-masked network's own effusion output
(if any) can label it there.

Precision: ``precision="bf16"`` (or ``"auto"`` on a processor with native bfloat16) runs bfloat16 copies of the
networks, their logits turned back to float32 before softmax; the default here is float32, the commands'
default is ``auto`` (:mod:`covidct.engine.precision`; Dice within 0.001 of float32 on the training slices).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from covidct.data.segmentation import LESION_CLASSES, is_lung_masked, lung_crop_box
from covidct.engine.precision import inference_dtype, resolve_precision
from covidct.io.body import mask_box
from covidct.models.fusion import fold_for_inference
from covidct.models.segmentation import SegmentationNet


#: Smoothed input level (model-input units, [0, 1]) from which a lesion pixel is consolidation.
CONSOLIDATION_LEVEL = 0.55
#: Gaussian smoothing (pixels of the slice) of the input before the density decision.
DENSITY_SIGMA_PX = 3.0
#: The same smoothing in mm, for slices with a known pixel size (CT scans): 3 pixels of the training slices,
#: whose 512² MedSeg frames have pixels of about 0.75 mm (MedSeg gives no spacing; a 360–400 mm field of view,
#: usual for chest CT, and the open 512² COVID-CT-MD scans' 0.64–0.75 mm). So a scan at another resolution
#: (cap001: 1.18 mm) is smoothed over the same anatomy.
DENSITY_SIGMA_MM = DENSITY_SIGMA_PX * 0.75


@dataclass
class SegPrediction:
    """One slice's result on its own grid: ``labels`` uint8 (values index
    :data:`~covidct.data.segmentation.LESION_CLASSES`), ``probs`` float32 ``(4, H, W)`` for
    background/GGO/consolidation/effusion (0 for classes the model lacks), ``lung_prob`` or ``None``;
    ``network``: ``"main"``, or ``"lung_masked"`` when the lung-masked companion segmented the slice."""

    labels: np.ndarray
    probs: np.ndarray
    lung_prob: np.ndarray | None
    network: str = "main"

    @property
    def infection_prob(self) -> np.ndarray:
        return self.probs[1] + self.probs[2]

    @property
    def lung(self) -> np.ndarray | None:
        return None if self.lung_prob is None else self.lung_prob > 0.5


class SegPredictor:
    """Batched, gradient-free inference with a :class:`SegmentationNet`."""

    def __init__(self, model: SegmentationNet, *, batch_size: int = 8, device: str = "cpu", tta: bool = False,
                 crop_to_lung: bool = True, density_classes: bool = True, fold_bn: bool = True,
                 effusion_model: SegmentationNet | None | str = "companion",
                 lung_masked_model: SegmentationNet | None | str = "companion", precision: str = "fp32") -> None:
        """``effusion_model``: a network with an effusion output run beside ``model``; ``"companion"`` (default)
        takes the one ``model``'s checkpoint carries, if any; ``None`` runs ``model`` alone.
        ``lung_masked_model``: a network that segments (instead of ``model``, without the effusion model) the
        slices found blacked out outside their lungs (needs ``model``'s lung head); ``"companion"`` (default)
        as for effusion. ``precision``:
        ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16 where the processor computes it natively;
        :mod:`covidct.engine.precision`)."""
        if effusion_model == "companion":
            effusion_model = getattr(model, "companions", {}).get("effusion")
        # BatchNorms folded into their convolutions (a copy; ``model`` is unchanged): 0-10 % faster with the
        # CLI's allocator, ~30 % with glibc's default; channels-last runs the depthwise convolutions of
        # EfficientNet-Lite ~1.5x faster
        # (the copy shares ``model.companions`` rather than copying networks it does not run itself)
        # bfloat16: the networks' copies hold bfloat16 weights and get bfloat16 inputs; logits come back as float32
        self.precision = resolve_precision(precision, device)
        self.dtype = inference_dtype(self.precision)
        companions = (model.companions,) if isinstance(getattr(model, "companions", None), dict) else ()
        self.model = self._for_inference(model, fold_bn, device, share=companions)
        self.device = device
        self.batch_size = batch_size
        self.tta = tta
        self.size = model.config.input_size
        names = model.config.lesion_classes
        self._value = np.array([LESION_CLASSES.index(n) for n in names], dtype=np.uint8)
        self._n_lesion = len(names)
        self.has_lung = model.config.lung_head
        self.crop_to_lung = crop_to_lung and self.has_lung
        self.density_classes = density_classes and {"ggo", "consolidation"} <= set(names)
        self.effusion = None
        if effusion_model is not None:
            if "effusion" not in effusion_model.config.lesion_classes:
                raise ValueError("the effusion model does not predict effusion")
            self.effusion = self._for_inference(effusion_model, fold_bn, device)
            self._effusion_index = effusion_model.config.lesion_classes.index("effusion")
        if lung_masked_model == "companion":
            lung_masked_model = getattr(model, "companions", {}).get("lung_masked")
        self.lung_masked: SegPredictor | None = None
        if lung_masked_model is not None and self.has_lung:
            self.lung_masked = SegPredictor(
                lung_masked_model, batch_size=batch_size, device=device, tta=tta, crop_to_lung=crop_to_lung,
                density_classes=density_classes, fold_bn=fold_bn, effusion_model=None,
                lung_masked_model=None, precision=precision)

    def _for_inference(self, net: SegmentationNet, fold_bn: bool, device: str, share: tuple = ()) -> torch.nn.Module:
        """``net`` (or, folded or in another dtype, a copy) in eval mode, channels-last, on ``device``."""
        if fold_bn:
            net = fold_for_inference(net, share=share)
        elif self.dtype != torch.float32:   # a copy: the caller's network keeps its float32 weights
            net = copy.deepcopy(net, memo={id(obj): obj for obj in share})
        return net.eval().to(device=device, dtype=self.dtype).to(memory_format=torch.channels_last)

    @property
    def predicts_effusion(self) -> bool:
        """Whether label 3 (pleural effusion) can appear in the predictions."""
        return self.effusion is not None or "effusion" in self.model.config.lesion_classes

    @torch.inference_mode()
    def _logits(self, batch: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        model = self.model if model is None else model
        out = model(batch).float()
        if self.tta:
            out = (out + torch.flip(model(torch.flip(batch, dims=[3])).float(), dims=[3])) / 2
        return out

    def predict(self, images: Sequence[np.ndarray], *, pixel_mm: float | None = None) -> list[SegPrediction]:
        """Predict for 2-D float arrays in ``[0, 1]`` (any sizes); slices not framed like the training
        slices get the second, lung-cropped pass (see the module docstring). ``pixel_mm``: the images'
        in-plane pixel size, if known; the density split then smooths over :data:`DENSITY_SIGMA_MM`."""
        results = self._predict_once(images, effusion=False)
        # the box of each slice framed wider than its lungs (the second pass cuts it to that box)
        boxes = [lung_crop_box(r.lung) if self.crop_to_lung else None for r in results]
        rest = list(range(len(images)))
        if self.lung_masked is not None:
            routed = [i for i in rest if is_lung_masked(images[i], results[i].lung)]
            if routed:
                for i, r in zip(routed, self.lung_masked._predict_in_boxes(
                        [images[i] for i in routed], [results[i] for i in routed], [boxes[i] for i in routed])):
                    r.network = "lung_masked"
                    results[i] = r
                rest = [i for i in rest if i not in set(routed)]
        # the second pass; the effusion companion runs once per slice: on the crop of a re-cropped slice (inside
        # the second pass), on the whole slice otherwise (a first-pass result that is replaced needs none)
        recropped = [i for i in rest if boxes[i] is not None]
        for i, r in zip(recropped, self._predict_in_boxes(
                [images[i] for i in recropped], [results[i] for i in recropped], [boxes[i] for i in recropped])):
            results[i] = r
        rest = [i for i in rest if boxes[i] is None]
        self._add_effusion([images[i] for i in rest], [results[i] for i in rest])
        if self.density_classes:
            sigma = DENSITY_SIGMA_PX if pixel_mm is None else DENSITY_SIGMA_MM / pixel_mm
            for im, r in zip(images, results):
                split_by_density(r.labels, np.asarray(im, np.float32), sigma_px=sigma)
        return results

    def _predict_in_boxes(self, images: Sequence[np.ndarray], firsts: Sequence[SegPrediction],
                          boxes: Sequence[tuple[slice, slice] | None]) -> list[SegPrediction]:
        """This network (and its effusion companion, if it has one) once on each image: on its box where one is given (the
        result pasted onto the image's grid, the lung outside the box from ``firsts``, a first pass), else on
        the whole image. The second pass of this predictor, and how the main predictor runs its lung-masked
        companion (on the main network's boxes: no first pass of the companion's own)."""
        inputs = [np.asarray(im)[b] if b is not None else im for im, b in zip(images, boxes)]
        return [r if b is None else _paste(f, r, b)
                for r, b, f in zip(self._predict_once(inputs), boxes, firsts)]

    def _predict_once(self, images: Sequence[np.ndarray], *, effusion: bool = True) -> list[SegPrediction]:
        """The main network on each image (and, with ``effusion``, the effusion companion)."""
        results: list[SegPrediction] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            logits = self._logits(self._batch(chunk, self.size))
            for im, lg in zip(chunk, logits):
                lg = F.interpolate(lg[None].float(), size=im.shape[-2:], mode="bilinear", align_corners=False)[0]
                results.append(self._decode(lg))
        if effusion:
            self._add_effusion(images, results)
        return results

    def _add_effusion(self, images: Sequence[np.ndarray], results: list[SegPrediction]) -> None:
        """Let the effusion companion (if any) decide effusion in ``results`` (in place): its effusion
        probability at its own resolution, resized to each image as one channel."""
        if self.effusion is None:
            return
        n, k = len(self.effusion.config.lesion_classes), self._effusion_index
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            logits = self._logits(self._batch(chunk, self.effusion.config.input_size), self.effusion)
            probs = torch.softmax(logits[:, :n].float(), dim=1)[:, k:k + 1]
            for im, result, prob in zip(chunk, results[start:start + self.batch_size], probs):
                prob = F.interpolate(prob[None], size=im.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
                _merge_effusion(result, prob.cpu().numpy())

    def _batch(self, chunk: Sequence[np.ndarray], size: int) -> torch.Tensor:
        return torch.stack([
            F.interpolate(torch.as_tensor(np.asarray(im, np.float32))[None, None], size=(size, size),
                          mode="bilinear", align_corners=False)[0]
            for im in chunk
        ]).to(device=self.device, dtype=self.dtype).to(memory_format=torch.channels_last)

    def _decode(self, logits: torch.Tensor) -> SegPrediction:
        n = self._n_lesion
        h, w = logits.shape[-2:]
        probs = np.zeros((len(LESION_CLASSES), h, w), dtype=np.float32)
        if n:
            p = torch.softmax(logits[:n], dim=0).cpu().numpy()
            probs[self._value] = p
            labels = self._value[p.argmax(axis=0)]
        else:
            probs[0] = 1.0
            labels = np.zeros((h, w), np.uint8)
        lung = torch.sigmoid(logits[n]).cpu().numpy() if self.has_lung else None
        return SegPrediction(labels.astype(np.uint8), probs, lung)


def _merge_effusion(result: SegPrediction, effusion_prob: np.ndarray) -> None:
    """The companion decides effusion (see the module docstring); ``result`` changes in place."""
    probs, labels = result.probs, result.labels
    main_effusion = labels == 3
    if main_effusion.any():   # the main network's own effusion pixels take its next most likely class
        labels[main_effusion] = probs[:3, main_effusion].argmax(axis=0)
    probs[3] = 0.0
    probs *= (1.0 - effusion_prob) / np.maximum(probs.sum(axis=0), 1e-12)
    probs[3] = effusion_prob
    labels[effusion_prob >= 0.5] = 3


def _paste(whole: SegPrediction, crop: SegPrediction, box: tuple[slice, slice]) -> SegPrediction:
    """The lung-cropped prediction inside ``box``; outside it background (lesions) and the first pass (lung)."""
    labels = np.zeros_like(whole.labels)
    labels[box] = crop.labels
    probs = np.zeros_like(whole.probs)
    probs[0] = 1.0
    probs[(slice(None),) + box] = crop.probs
    lung = None
    if whole.lung_prob is not None:
        lung = whole.lung_prob.copy()
        lung[box] = crop.lung_prob
    return SegPrediction(labels, probs, lung)


def split_by_density(labels: np.ndarray, image01: np.ndarray, *, level: float = CONSOLIDATION_LEVEL,
                     sigma_px: float = DENSITY_SIGMA_PX) -> np.ndarray:
    """Relabel the GGO + consolidation pixels of ``labels`` (in place) by the smoothed density of
    ``image01`` (model input, [0, 1]): consolidation (2) from ``level`` up, GGO (1) below."""
    from scipy import ndimage

    lesion = (labels == 1) | (labels == 2)
    core = mask_box(lesion, pad=0)
    if core is None:
        return labels
    # filter only as far as the filter reaches (scipy truncates at 4 sigma): the values of filtering it all
    box = mask_box(lesion, pad=int(np.ceil(4 * sigma_px)))
    inner = tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(core, box))
    dense = (ndimage.gaussian_filter(image01[box], sigma_px) >= level)[inner]
    sub, les = labels[core], lesion[core]
    sub[les & dense] = 2
    sub[les & ~dense] = 1
    return labels
