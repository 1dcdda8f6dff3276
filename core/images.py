"""Reading arbitrary image files into the lab's 32×32 RGB uint8 format, safely."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from .errors import LabError

MAX_PIXELS = 40_000_000  # refuse decompression bombs well before they eat memory
DRAFT_SIZE = 128         # a JPEG decoded at reduced scale keeps at least 4x the 32 pixels the models see


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode (L, LA, P, RGBA, CMYK, I;16, F) to RGB; transparency goes on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def open_image(source, min_size: int | None = None) -> Image.Image:
    """Open a path, bytes or file-like as RGB; LabError for non-images, truncation and bombs.

    With min_size, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (its DCT allows it) as long as both
    sides stay at least min_size: for a 32x32 result the pixels hardly change, and a 12-megapixel
    photo decodes 3.5x faster (README, "Your own images")."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(source) as img:
            if img.width * img.height > MAX_PIXELS:
                raise LabError(f"image is too large ({img.width}×{img.height} pixels)")
            if min_size:
                img.draft(None, (min_size, min_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except LabError:
        raise
    except Image.DecompressionBombError:
        raise LabError("image is too large (refused as a possible decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise LabError(f"{_name(source)}is not an image the lab can read; upload a JPEG, PNG, WebP, BMP, "
                       "GIF or TIFF file") from None
    except (OSError, SyntaxError, ValueError) as exc:   # PIL's signals for truncated/corrupt data
        raise LabError(f"{_name(source)}looks like an image but is damaged or truncated ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any other decoder failure is still the file's fault
        raise LabError(f"{_name(source)}could not be decoded as an image ({type(exc).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _name(source) -> str:
    name = getattr(source, "name", None) or (source if isinstance(source, str) else None)
    return f"{str(name).rsplit('/', 1)[-1]!r} " if name else "the file "


def load_image_32(source) -> np.ndarray:
    """Any image -> 3×32×32 uint8, resized with antialiasing (as the models see it)."""
    img = open_image(source, min_size=DRAFT_SIZE)
    if img.size != (32, 32):
        img = img.resize((32, 32), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
