"""Reading user inputs: images (any format PIL reads) and prompts, with one-line errors."""

from __future__ import annotations

import os
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

# Decoded images above this many pixels are refused before decoding (a decompression bomb is tiny on
# disk and huge in memory); the processor downsizes far below this anyway.
MAX_INPUT_PIXELS = 16384 * 16384


def load_image(path: str, max_input_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Open ``path`` as an RGB image with its EXIF orientation applied.

    RGBA / LA / palette-with-transparency images are composited on white; greyscale and other modes are
    converted to RGB. Raises :class:`InputError` for a missing, unreadable, corrupt or oversized image.
    """
    if not os.path.exists(path):
        raise InputError(f"image not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"image path is a directory: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_input_pixels:
                    raise InputError(
                        f"image {path} is {w}x{h} = {w * h} pixels, over the cap of {max_input_pixels}")
                im = ImageOps.exif_transpose(im)
                im.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"image {path} is over the pixel cap: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"not an image PIL can read: {path}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def check_prompt(prompt: str | None) -> str:
    """A non-empty prompt, or :class:`InputError`."""
    if prompt is None or not prompt.strip():
        raise InputError("the prompt is empty")
    return prompt
