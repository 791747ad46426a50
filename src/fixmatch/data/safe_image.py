"""Opening untrusted image files: a pixel limit against decompression bombs and a short list of formats.

A small file can declare a huge image (a PNG of 50,000 x 50,000 pixels compresses to a few MB and decodes to
7.5 GB); the limit is checked on the header, before anything is decoded. Pillow's own guard
(``Image.MAX_IMAGE_PIXELS``) is process-wide and only warns below twice its value, so the limit here is
explicit. The formats are those photographs and data sets come in: Pillow's EPS reader, for one, would run
Ghostscript on the file.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .download import DatasetError

MAX_PIXELS = 64 * 1024 * 1024  # 64 Mpixel: above any camera photo in common use, 192 MB once decoded as RGB
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")

__all__ = ["FORMATS", "MAX_PIXELS", "open_image"]


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``path`` (its first frame) if it is a PNG/JPEG/BMP/GIF/TIFF/WebP/PPM of at most ``max_pixels``.

    Raises ``DatasetError`` naming the file and the problem otherwise; never decodes an oversized image.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below applies instead
            img = Image.open(path, formats=FORMATS)  # reads the header only
        try:
            w, h = img.size
            if w * h > max_pixels:
                raise DatasetError(f"image {path} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                                   f"(a decompression bomb or an oversized file); resize or remove it")
            img.load()
        except BaseException:
            img.close()
            raise
    except UnidentifiedImageError:
        raise DatasetError(f"{path} is not an image in a supported format ({', '.join(FORMATS)}); "
                           f"convert or remove it") from None
    except Image.DecompressionBombError as e:  # Pillow's own limit (twice MAX_IMAGE_PIXELS), checked at open
        raise DatasetError(f"image {path} is too large to decode safely ({e}); resize or remove it") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying corrupt or truncated
        raise DatasetError(f"cannot decode image {path} ({e}); replace or remove it") from None
    return img
