"""Opening one image file the same way everywhere (training data, ``eedn predict``): a corrupt file, a
decompression bomb or an unreadable format is a one-line error naming the file, and 16-bit images are
scaled to 8 bits rather than clipped (PIL's ``convert("L")`` saturates every value above 255)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from eedn.runtime.errors import EednError

if TYPE_CHECKING:
    from PIL.Image import Image

#: file name endings read as images (image-folder datasets, ``eedn predict``), compared in lower case
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".gif", ".tif", ".tiff", ".webp")
#: PIL modes holding more than 8 bits per pixel, read as integers
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_eight_bit(image: Image) -> Image:
    """A 16-bit (or 32-bit integer) grayscale image as 8-bit ``L``, scaled by its type's range; others as given."""
    if image.mode not in WIDE_INTEGER_MODES:
        return image
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else float(2**31 - 1)
    scaled = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def open_image(path: str | os.PathLike, mode: str) -> Image:
    """The image at ``path`` decoded and converted to ``mode`` ("L" or "RGB")."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return to_eight_bit(image).convert(mode)
    except Image.DecompressionBombError as exc:
        raise EednError(f"image {path} is too large to decode safely ({exc}); resize it or remove it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise EednError(f"cannot read image {path} ({exc}); replace or remove the file") from None
