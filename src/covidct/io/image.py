"""2-D image slices (PNG, JPG, BMP, TIFF) of any PIL mode, as one-slice volumes.

Colour images become grey with ITU-R 601 luma; alpha is dropped (composited on black where it is
not opaque); 16-bit and float images keep their values. Files are opened by content, not by
extension (many ``.png`` files in public sets are JPEG).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from covidct.errors import InputError
from covidct.io.volume import Volume, fill_non_finite

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: A pixel counts as coloured when its red, green and blue values spread over more than this (of 255).
COLOUR_SPREAD = 30


def colour_share(rgb: np.ndarray) -> float:
    """Share of the pixels of an ``(H, W, 3)`` image whose channels spread over more than
    :data:`COLOUR_SPREAD`: 0 for grey images, most of the image for photographs."""
    return float(np.mean(rgb.max(axis=-1) - rgb.min(axis=-1) > COLOUR_SPREAD))


def png_info():
    """PNG text chunks for every PNG covidct writes: the software and the disclaimer
    (:data:`covidct.IMAGE_METADATA`); pass as ``Image.save(..., pnginfo=png_info())``."""
    from PIL.PngImagePlugin import PngInfo

    from covidct import IMAGE_METADATA

    info = PngInfo()
    for key, text in IMAGE_METADATA.items():
        info.add_text(key, text)
    return info


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


#: Images smaller than this on either side are refused (an icon or a thumbnail strip, not a CT slice).
MIN_IMAGE_SIDE = 16


def load_grey(path: str | Path) -> tuple[np.ndarray, str]:
    """Decode an image file into a 2-D float32 grey array; returns ``(array, PIL mode)``."""
    arr, mode, _ = load_grey_and_colour(path)
    return arr, mode


def load_grey_and_colour(path: str | Path) -> tuple[np.ndarray, str, float]:
    """:func:`load_grey` and the image's :func:`colour_share` (0 for grey modes)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    colour = 0.0
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
                alpha = rgba[..., 3:4] / 255.0
                rgb = rgba[..., :3] * alpha
                colour = colour_share(rgb)
                arr = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            elif mode in ("RGB", "P", "CMYK", "YCbCr", "HSV", "LAB"):
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
                colour = colour_share(rgb)
                arr = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            elif mode == "1":
                arr = np.asarray(im.convert("L"), dtype=np.float32)
            else:  # L, I;16*, I, F
                arr = np.asarray(im, dtype=np.float32)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except UnidentifiedImageError:
        raise InputError(path, "not an image file PIL can decode") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(path, f"corrupt or truncated image ({exc})") from None
    if arr.ndim == 3:  # multi-channel modes we did not map
        arr = arr.mean(axis=2)
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(path, f"expected a 2-D image, got shape {arr.shape}")
    if min(arr.shape) < MIN_IMAGE_SIDE:
        raise InputError(path, f"image is {arr.shape[1]}×{arr.shape[0]} pixels: too small for a CT slice "
                               f"(at least {MIN_IMAGE_SIDE} on each side)")
    arr = np.require(arr, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])   # PIL's arrays are read-only
    fill_non_finite(arr[None], path)   # float TIFF ("F"): NaN / infinite pixels read as the lowest value
    return arr, mode, round(colour, 4)


def load_label_map(path: str | Path) -> np.ndarray:
    """A label-map PNG (pixel value = class index) as uint8 ``(H, W)``."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im if im.mode in ("L", "P", "1") else im.convert("L"))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Exception as exc:
        raise InputError(path, f"unreadable label map ({exc})") from None
    return arr.astype(np.uint8)


def read_image(path: str | Path) -> Volume:
    path = Path(path)
    arr, mode, colour = load_grey_and_colour(path)
    return Volume(
        array=arr[None],
        kind="image",
        source=path,
        is_hu=False,
        spacing=None,
        files=[str(path)],
        metadata={"modality": None, "image_mode": mode, "colour_share": colour},
    )


def natural_key(path: Path) -> list:
    """Sort key that orders ``slice2`` before ``slice10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def list_images(folder: str | Path) -> list[Path]:
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and is_image(p)), key=natural_key)


def read_image_folder(folder: str | Path) -> Volume:
    """A folder of same-size slice images (natural name order) as one stack."""
    folder = Path(folder)
    paths = list_images(folder)
    skipped = sum(1 for p in folder.iterdir() if p.is_file()) - len(paths)
    if not paths:
        raise InputError(folder, "no image files found")
    slices, colour = [], 0.0
    for p in paths:
        arr, mode, share = load_grey_and_colour(p)
        if slices and arr.shape != slices[0].shape:
            raise InputError(p, f"slice size {arr.shape} differs from the first slice {slices[0].shape}")
        slices.append(arr)
        colour = max(colour, share)
    return Volume(
        array=np.stack(slices),
        kind="image-folder",
        source=folder,
        is_hu=False,
        spacing=None,
        files=[str(p) for p in paths],
        n_skipped=skipped,
        metadata={"modality": None, "image_mode": mode, "colour_share": colour},   # the most coloured slice's
    )
