"""Record images: opened from a path, PIL image or `datasets.Image` dict, fully decoded, upright, as 8-bit RGB.

Upright: a photo's EXIF orientation (a phone's `Orientation=6`, stored sideways) is applied, as every image viewer
does, so the model sees what the user sees; `image_size` gives the size after it, from the header alone.

`to_rgb` is ours, not PIL's `convert("RGB")`: that drops transparency onto black and clips 16-bit grayscale to
white; viewers and transformers' processors composite onto white.
"""

import io
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# What PIL raises for a file it cannot open or decode: truncated data is an OSError, some broken headers a
# SyntaxError, and an image over `Image.MAX_IMAGE_PIXELS` (e.g. 20000x20000) a DecompressionBombError, which
# derives from Exception only.
_UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# EXIF orientations that turn the image by 90 degrees (transposed, rotated 270, transversed, rotated 90).
_QUARTER_TURNS = (5, 6, 7, 8)


def to_rgb(image):
    """Any PIL image → 8-bit RGB. Transparency is composited onto white (as a viewer shows it, and as transformers'
    processors do); 16-bit grayscale is scaled to 8 bits rather than clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # `convert("L")` would clip everything above 255 to white; mode "I" is how older Pillow opened 16-bit PNGs.
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":
        raise ValueError("32-bit float images (mode 'F') have no defined intensity range; convert them to 8-bit first")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _describe(image):
    if isinstance(image, dict):
        return image.get("path") or "<embedded bytes>"
    if isinstance(image, Image.Image):
        return "<PIL image>"
    return str(image)


def _open(image):
    """A record's image (path, PIL, or a `datasets.Image` dict with bytes/path) → lazily opened PIL image."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        return Image.open(image)
    if isinstance(image, dict) and (image.get("bytes") is not None or image.get("path")):
        return Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") is not None else Image.open(image["path"])
    raise TypeError(f"an image must be a path, a PIL image or a dict with 'bytes'/'path', got {type(image).__name__}")


def load_image(image, record_id):
    """Open and fully decode a record's image as RGB; failures name the record and the file."""
    try:
        opened = _open(image)
        try:
            opened.load()
            upright = ImageOps.exif_transpose(opened)  # a new image when the EXIF says to turn it, else a copy
            return to_rgb(upright)
        finally:
            if opened is not image:  # close only what we opened; a caller's PIL image stays usable
                opened.close()
    except _UNREADABLE as error:
        raise ValueError(f"record {record_id!r}: cannot read image {_describe(image)}: {error}") from error


def _upright_size(image):
    """(width, height) once the EXIF orientation is applied (read from the header, no pixels decoded)."""
    width, height = image.size
    # A PNG's EXIF may follow its pixels, and `getexif` would decode them all to find it: only a chunk read with the
    # header counts here (one after the pixels makes `load_image` disagree with this size, a clear error).
    if image.format == "PNG" and "exif" not in image.info:
        return width, height
    if image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS:
        return height, width
    return width, height


def image_size(image, record_id):
    """(width, height) from the file header only, without decoding pixels."""
    if isinstance(image, Image.Image):
        return _upright_size(image)
    try:
        with _open(image) as opened:
            return _upright_size(opened)
    except _UNREADABLE as error:
        raise ValueError(f"record {record_id!r}: cannot read image {_describe(image)}: {error}") from error


def decoded_size(image, record_id):
    """(width, height) after decoding every pixel, which finds truncated and corrupted files."""
    return load_image(image, record_id).size


__all__ = ["to_rgb", "load_image", "image_size", "decoded_size"]
