"""Slice segmentation sets in the COVID-SemiSeg layout.

```
FOLDER/
  images/<id>.<png|jpg|...>
  masks/<id>.png     0 background, 1 GGO, 2 consolidation (medseg-512: 3 = pleural effusion);
                     or binary infection masks, 0 / 255 in every file (Inf-Net's LungInfection GT): infection only
  masks4/<id>.png    optional: 0 background, 1 GGO, 2 consolidation, 3 pleural effusion
  lung/<id>.png      optional: 0/1 lung field
  manifest.csv       optional: a ``split`` column is honoured by ``split=``
```
Label maps carry the class index as the pixel value, except binary infection masks: a ``masks/`` folder
(without ``masks4/``) whose files hold only the values 0 and 255 is read as infection / background, with
no lesion type (:attr:`SegFolder.binary`): evaluation scores infection (and lung), training refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from covidct.data.tables import read_table
from covidct.errors import InputError, require_folder
from covidct.io.body import mask_box
from covidct.io.image import list_images, load_grey, load_label_map

#: Lesion label values shared by every model and report.
LESION_CLASSES: tuple[str, ...] = ("background", "ggo", "consolidation", "effusion")
#: Display colours (RGB): GGO red, consolidation blue, effusion green.
LESION_COLOURS: dict[str, tuple[int, int, int]] = {
    "ggo": (255, 0, 0),
    "consolidation": (0, 90, 255),
    "effusion": (0, 200, 0),
    "lung": (255, 220, 0),
}


@dataclass
class SegSample:
    """One slice: grey image ``(H, W)`` float32 0..255, lesion labels ``(H, W)`` uint8 in
    0..3 (3 only when ``has_effusion``), optional lung mask ``(H, W)`` uint8 0/1."""

    id: str
    image_path: Path
    image: np.ndarray
    labels: np.ndarray
    lung: np.ndarray | None
    has_effusion: bool
    #: False for a binary infection mask: ``labels`` 1 then means "infection" of unknown type (never 2 or 3)
    has_types: bool = True


#: A slice whose lung box (+3 % of the slice per side) covers less than this share of it is framed wider
#: than the lung-ROI crops the models train on (COVID-SemiSeg: ≈ 1; full CT frames: ≈ 0.3-0.5).
CROP_MAX_FRACTION = 0.7


def lung_crop_box(lung: np.ndarray | None) -> tuple[slice, slice] | None:
    """The box (+3 % per side) of a lung mask when the slice is framed wider than its lungs (the box
    covers less than :data:`CROP_MAX_FRACTION` of it and is at least 16 pixels a side), else None."""
    if lung is None:
        return None
    box = mask_box(lung)
    if box is None:
        return None
    h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
    if h >= 16 and w >= 16 and h * w < CROP_MAX_FRACTION * lung.shape[-2] * lung.shape[-1]:
        return box
    return None


#: Grey level (of [0, 1]) up to which a pixel counts as blacked out (2 of 255: JPG noise on black).
LUNG_MASKED_BLACK = 2 / 255
#: A slice is rendered "lung-masked" (black outside its lung field, as the MedSeg 512² frames) when at
#: least this share of its pixels outside the lungs is black (MedSeg frames 0.93-1.00; COVID-SemiSeg crops
#: at most 0.02; UCSD figures, mediastinal windows with black lungs included, at most 0.79; HU slices 0).
LUNG_MASKED_SHARE = 0.9
#: ... and those pixels are at least this share of the slice (a lung filling its slice says nothing).
LUNG_MASKED_MIN_OUTSIDE = 0.2
#: The lung mask is widened by this many pixels first (a blurred or slightly missed lung edge).
LUNG_MASKED_DILATION_PX = 5


def lung_masked_shares(image01: np.ndarray, lung: np.ndarray) -> tuple[float, float]:
    """``(share of the slice outside the widened lung, share of those pixels that are black)`` for
    :func:`is_lung_masked`."""
    from scipy import ndimage

    outside = ~ndimage.binary_dilation(lung, iterations=LUNG_MASKED_DILATION_PX)
    black = np.asarray(image01)[outside] <= LUNG_MASKED_BLACK
    return float(outside.mean()), float(black.mean()) if black.size else 0.0


def is_lung_masked(image01: np.ndarray, lung: np.ndarray | None) -> bool:
    """Whether ``image01`` (grey, [0, 1]) is blacked out outside ``lung`` (its lung mask, e.g. the lung
    head's): at least :data:`LUNG_MASKED_SHARE` of the pixels outside the widened lung are black and they
    cover at least :data:`LUNG_MASKED_MIN_OUTSIDE` of the slice. False without a lung mask."""
    if lung is None or not lung.any():
        return False
    if (np.asarray(image01) <= LUNG_MASKED_BLACK).mean() < LUNG_MASKED_SHARE * LUNG_MASKED_MIN_OUTSIDE:
        return False     # too little black anywhere (cheap: no dilation)
    outside, black = lung_masked_shares(image01, lung)
    return outside >= LUNG_MASKED_MIN_OUTSIDE and black >= LUNG_MASKED_SHARE


def crop_to_lung(sample: SegSample) -> SegSample:
    """``sample`` cut to its reference lung box when it is framed wider than its lungs (a MedSeg 512²
    frame), as the predictor's second pass cuts such slices at inference; otherwise unchanged."""
    box = lung_crop_box(sample.lung)
    if box is None:
        return sample
    return replace(sample, image=sample.image[box].copy(), labels=sample.labels[box].copy(),
                   lung=sample.lung[box].copy())


class SegFolder:
    """A folder in the COVID-SemiSeg layout; indexable, yields :class:`SegSample`."""

    def __init__(self, root: str | Path, *, split: str | None = None, ids: list[str] | None = None) -> None:
        self.root = Path(root)
        images_dir = self.root / "images"
        require_folder(self.root, hint="a segmentation folder holds images/ and masks/")
        if not images_dir.is_dir():
            raise InputError(self.root, "not a segmentation folder: no images/ subfolder")
        masks_dir = self.root / "masks"
        masks4_dir = self.root / "masks4"
        if not masks_dir.is_dir() and not masks4_dir.is_dir():
            raise InputError(self.root, "not a segmentation folder: no masks/ or masks4/ subfolder")
        self.has_masks4 = masks4_dir.is_dir()
        self.has_lung = (self.root / "lung").is_dir()
        images = {p.stem: p for p in list_images(images_dir)}
        if split is not None:
            wanted = self._manifest_ids(split)
            images = {k: v for k, v in images.items() if k in wanted}
        if ids is not None:
            unknown = [k for k in ids if k not in images]
            if unknown:
                raise InputError(self.root, f"no image with id {', '.join(unknown[:5])}"
                                            f"{' ...' if len(unknown) > 5 else ''}{' in split ' + split if split else ''}")
            images = {k: images[k] for k in ids}
        self.ids = [k for k in images if (masks4_dir if self.has_masks4 else masks_dir).joinpath(k + ".png").exists()]
        #: images with no label map of the same name: left out of every use of the folder (evaluations say so)
        self.images_without_mask = [k for k in images if k not in set(self.ids)]
        if not self.ids:
            raise InputError(self.root, "no image with a matching mask found")
        self._images = images
        self._check_sizes()
        values = set() if self.has_masks4 else self._mask_values()
        #: masks/ holds binary infection masks (only 0 and 255): infection without its type
        self.binary = bool(values) and values <= {0, 255} and 255 in values
        # Effusion is labelled when masks4/ exists, or when masks/ itself uses label 3 (medseg-512).
        self.has_effusion = self.has_masks4 or 3 in values
        self.groups = self._manifest_groups()

    def _manifest_groups(self) -> list[str]:
        """A key per slice naming its source slice (manifest ``infnet_id``), so that one slice
        stored in two folders (COVID-SemiSeg crop and MedSeg frame) lands in one split."""
        manifest = self.root / "manifest.csv"
        groups = {k: k for k in self.ids}
        if manifest.exists():
            for r in read_table(manifest):
                stem = Path(r.get("image") or "").stem
                if stem in groups and r.get("infnet_id"):
                    groups[stem] = f"infnet:{r['infnet_id']}"
        return [groups[k] for k in self.ids]

    def _manifest_ids(self, split: str) -> set[str]:
        manifest = self.root / "manifest.csv"
        if not manifest.exists():
            raise InputError(manifest, "split requested but there is no manifest.csv")
        rows = read_table(manifest, ("image", "split"))
        wanted = {Path(r["image"]).stem for r in rows if r["split"] == split}
        if not wanted:
            splits = sorted({r["split"] for r in rows})
            raise InputError(manifest, f"no slice in split {split!r} (its splits: {', '.join(splits)})")
        return wanted

    def _check_sizes(self) -> None:
        """Every label map the same size as its image, read from the file headers before any work starts
        (a mismatch found half-way through an evaluation or a training run would waste it)."""
        from PIL import Image, UnidentifiedImageError

        def size(path: Path) -> tuple[int, int]:
            try:
                with Image.open(path) as im:
                    return im.height, im.width
            except (OSError, UnidentifiedImageError) as exc:
                raise InputError(path, f"not a readable image ({type(exc).__name__})") from None

        for k in self.ids:
            want = size(self._images[k])
            for sub in ("masks", "masks4", "lung"):
                mask = self.root / sub / f"{k}.png"
                if mask.exists() and size(mask) != want:
                    raise InputError(mask, f"size {size(mask)} differs from its image {self._images[k].name} {want}")

    def _mask_values(self) -> set[int]:
        """Every value found in masks/ (read once, before any work)."""
        values: set[int] = set()
        for k in self.ids:
            values.update(int(v) for v in np.unique(load_label_map(self.root / "masks" / f"{k}.png")))
        return values

    def require_types(self, use: str) -> None:
        """:class:`InputError` when the masks are binary (no GGO / consolidation) and ``use`` needs the types."""
        if self.binary:
            raise InputError(self.root / "masks", f"binary infection masks (0 / 255): {use} needs class-index masks "
                                                  "(0 background, 1 GGO, 2 consolidation, 3 effusion)")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> SegSample:
        k = self.ids[index]
        image, _ = load_grey(self._images[k])
        labels = load_label_map(self.root / ("masks4" if self.has_masks4 else "masks") / f"{k}.png")
        if self.binary:
            labels = (labels > 0).astype(np.uint8)
        if labels.max() > 3:
            raise InputError(self.root / "masks" / f"{k}.png", f"label value {labels.max()} is not a class index (0..3)")
        if not self.has_effusion:
            labels = np.where(labels == 3, 0, labels).astype(np.uint8)
        lung = None
        if self.has_lung and (self.root / "lung" / f"{k}.png").exists():
            lung = (load_label_map(self.root / "lung" / f"{k}.png") > 0).astype(np.uint8)
        if labels.shape != image.shape:
            raise InputError(self._images[k], f"mask size {labels.shape} differs from the image {image.shape}")
        return SegSample(k, self._images[k], image, labels, lung, self.has_effusion, has_types=not self.binary)
