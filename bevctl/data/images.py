"""Reading camera images: the one reader of the pseudo-label job and the training dataset."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from bevctl.errors import BevctlError


class ImageError(BevctlError):
    """An image that cannot be read (missing, corrupt): ``"<path>: <reason>"``; ``reason``
    alone for callers that record it per image (the pseudo-label job)."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        # one argument: the whole message (torch re-raises a DataLoader worker's error that way)
        super().__init__(path if reason is None else f"{path}: {reason}")
        self.path, self.reason = path, path if reason is None else reason


def read_image(path: str, size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image as uint8 RGB ``(H, W, 3)``, resized (bilinear) to ``size_hw`` if given.

    A JPEG at least twice the target size in both directions is decoded in draft mode (a
    DCT-domain downscale by 2/4/8: much faster) before the resize.
    """
    try:
        with Image.open(path) as img:
            if size_hw is not None:
                h, w = size_hw
                if img.format == "JPEG" and img.width >= 2 * w and img.height >= 2 * h:
                    img.draft("RGB", (w, h))
            img.load()
            img = img.convert("RGB")
            if size_hw is not None and img.size != (size_hw[1], size_hw[0]):
                img = img.resize((size_hw[1], size_hw[0]), Image.BILINEAR, reducing_gap=None)
            return np.asarray(img)
    except FileNotFoundError:
        raise ImageError(path, "missing image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, f"corrupt image ({e})") from None
