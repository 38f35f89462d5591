"""Images in requests to an image classifier: each input of /v1/classify (and gRPC Classify) is a base64
PNG or JPEG, or a `data:image/...;base64,` URL. The ingress decodes them with the same function that
made the training data (actors/prepare_images.py: mode conversion, resize, centre crop), so a served
model sees what it was trained on; the replica gets fixed-size uint8 pixels.

A mistake names the input it is in: 400 for bytes that are not base64 or not a decodable image, 413
for an image over `max_image_pixels` (checked from its header, before it is decoded).
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from actors.prepare_images import decode

DATA_URL = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
WHY = {"empty_file": "is empty", "not_an_image": "is not a PNG or JPEG image", "truncated": "is a truncated image",
       "corrupt": "is a corrupt image", "too_small": "is too small"}


class ImageError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def image_bytes(text: str, index: int) -> bytes:
    """The bytes of input `index`: base64, or a data URL's payload."""
    match = DATA_URL.match(text)
    payload = text[match.end():] if match else text
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(400, f"input[{index}]: is not base64 image data (nor a data:image/...;base64, URL)") from None


def pixels_of(text: str, index: int, size: int, channels: int, max_pixels: int) -> bytes:
    """Input `index` as the model's uint8 pixels (size x size x channels, row-major), or an ImageError."""
    from PIL import Image

    raw = image_bytes(text, index)
    try:  # the header alone: an oversized image is refused before its pixels are decoded
        width, height = Image.open(io.BytesIO(raw)).size
    except Image.DecompressionBombError:  # Pillow's own limit, far over any max_pixels
        raise ImageError(413, f"input[{index}]: the image has more pixels than Pillow will decode") from None
    except Exception:  # noqa: BLE001 - decode() below names what is wrong
        width = height = 0
    if width * height > max_pixels:
        raise ImageError(413, f"input[{index}]: the image is {width}x{height}, more than {max_pixels:,} pixels")
    pixels, reason, _ = decode(raw, size, channels, 1)
    if pixels is None:
        raise ImageError(400, f"input[{index}]: {WHY.get(reason, reason)}")
    return pixels.tobytes()


def probe_images() -> list[str]:
    """Three known images, base64 PNG: the glyphs 0, 1 and 7 in the first shipped font that draws them,
    rendered the same way every time (the monitor's probe of an image classifier, and jobs.serve's
    sample request)."""
    from actors.prepare_images import font_files, render_glyph

    font = font_files("017")[0]
    return [base64.b64encode(render_glyph(font, c, 0, {"degrade_to": 8})).decode() for c in "017"]
