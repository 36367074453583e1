"""Decode only what a view needs, then cut, resize, flip and relight it, all in uint8.

Fast path (baseline and progressive JPEG in YCbCr or grayscale, i.e. nearly all of ImageNet): libjpeg-turbo
through simplejpeg, decoding at the smallest 1/d scale (d in 1, 2, 4, 8) at which the view's box still has at
least the output resolution, so a large image whose crop is downscaled anyway is never decoded at full size.
Only the 1/2, 1/4, 1/8 factors are used because libjpeg-turbo has SIMD inverse DCTs for exactly those; the
other M/8 factors measured no faster (7/8 and 5/8 slower) than a full decode. Entropy (Huffman) decoding, which
no scale factor avoids, is most of the cost of an ImageNet-sized file, so scaling pays off on large images.
Region decoding: where the small C extension `rtrain.data._jpeg_region` was built (`pip install` skips it when
libjpeg's headers are missing) and a libjpeg-turbo shared library loads (Pillow's bundled 3.x first, then the
system's; see libjpeg_candidates), only the view's box is decoded: rows above the box are entropy-decoded but
not transformed (jpeg_skip_scanlines), columns beside it are neither inverse-transformed nor colour-converted
(jpeg_crop_scanline), and decoding stops below the box. Its pixels are bit-identical to the whole-image
decode's (tests/unit/test_decode_region.py); without the extension the whole (scaled) image is decoded through
simplejpeg, as Pillow and simplejpeg expose no region decoding. The resize writes into the caller's `out`
(a batch slot); flipping and relighting happen there too.

Fallback (PNG bytes, CMYK/YCCK JPEG, anything simplejpeg refuses): Pillow with `draft` (the same reduced-scale
decoding for JPEG) and a conversion to RGB. The cut-and-resize is torch's uint8 antialiased bilinear resize
(vectorized; it matches Pillow's bilinear filter, which torchvision's RandomResizedCrop uses on PIL images, to
within rounding) applied to the box only. Train and eval use the same decoder.
"""

from __future__ import annotations

import glob
import io
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image

from rtrain._errors import ExpectedError
from rtrain.data.transforms import View

try:  # optional: built by `pip install` where libjpeg's headers exist (see setup.py)
    from rtrain.data import _jpeg_region
except ImportError:  # pragma: no cover - depends on the build machine
    _jpeg_region = None
_resize_aa = torch._C._nn._upsample_bilinear2d_aa
log = logging.getLogger("rtrain.data")

# libjpeg-turbo scale denominators with SIMD inverse DCTs (see the module docstring).
FAST_DENOMINATORS = (8, 4, 2, 1)
# libjpeg's fast (box) chroma upsampling and its fast integer IDCT: together 1.24 vs 1.50 ms per ImageNet-sized
# JPEG on an idle H100 host core (Pillow's full decode: 1.84 ms). Against the exact decode the output keeps
# 34-38 dB PSNR on photo-like 4:2:0 images (tests/unit/test_decode.py holds the >= 30 dB bound).
FAST_UPSAMPLE = True
FAST_DCT = True
_FAST_COLORSPACES = ("YCbCr", "Gray")
# The most pixels a header may claim (data.max_image_pixels): Pillow's own MAX_IMAGE_PIXELS (it warns above it and
# refuses twice as many); ImageNet's files average 468 x 401. A decode of that many RGB pixels needs ~270 MB.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# The only formats Pillow may open (the fallback decoder): what ImageNet holds (JPEG, CMYK JPEG, a PNG named
# .JPEG). Other formats' plugins are never asked (EPS would run Ghostscript where installed).
OPENED_FORMATS = ("JPEG", "PNG")


def libjpeg_candidates() -> list[str]:
    """libjpeg-turbo shared libraries for region decoding, best first: $RTRAIN_LIBJPEG alone if set, else the
    one bundled with Pillow's wheel (libjpeg-turbo 3.x, as simplejpeg's) and the system's. Only libraries of
    the ABI the extension was compiled for can load (jpeglib.h's JPEG_LIB_VERSION: 62 on Debian, 80 where
    libjpeg-turbo8-dev provided the headers); Pillow bundles a 62 one."""
    import PIL

    forced = os.environ.get("RTRAIN_LIBJPEG")
    if forced:
        return [forced]
    version = getattr(_jpeg_region, "JPEG_LIB_VERSION", 62)
    system = "libjpeg.so.62" if version == 62 else f"libjpeg.so.{version // 10}"
    bundled = []
    if version == 62:
        for folder in ("pillow.libs", "Pillow.libs"):
            bundled += sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(PIL.__file__)), folder,
                                                     "libjpeg*.so*")))
    return [*bundled, system]


def _self_test_cases() -> tuple[bytes, list[tuple[int, tuple[int, int, int, int], np.ndarray]]]:
    """A 4:2:0 test JPEG and (denominator, region, simplejpeg's pixels of it): the whole image, and regions with
    an odd first row and a cropped left edge at full and half scale (the skip and crop paths, where old
    libjpeg-turbo releases had bugs)."""
    pixels = np.arange(48 * 40 * 3, dtype=np.uint8).reshape(48, 40, 3)
    probe_jpeg = simplejpeg.encode_jpeg(pixels, quality=90, colorsubsampling="420")
    cases = []
    for denominator, (x0, y0, x1, y1) in ((1, (0, 0, 40, 48)), (1, (9, 17, 31, 41)), (2, (3, 5, 17, 23))):
        whole = simplejpeg.decode_jpeg(probe_jpeg, colorspace="RGB", fastdct=True, fastupsample=True,
                                       min_height=48 // denominator, min_width=40 // denominator)
        cases.append((denominator, (x0, y0, x1, y1), whole[y0:y1, x0:x1]))
    return probe_jpeg, cases


def _self_test_passes(probe_jpeg: bytes, cases: list[tuple[int, tuple[int, int, int, int], np.ndarray]]) -> bool:
    """The loaded library decodes every case's region exactly as simplejpeg does."""
    out = np.empty(48 * 40 * 3, dtype=np.uint8)
    for denominator, box, expected in cases:
        try:
            _jpeg_region.decode_region(probe_jpeg, denominator, *box, out)
        except ValueError:
            return False
        if not np.array_equal(out[:expected.size].reshape(expected.shape), expected):
            return False
    return True


def _load_region_library() -> str | None:
    """Load the first candidate that opens and passes the self-test; its path, or None (region decoding off:
    whole images are decoded, which a warning says when the extension itself was built)."""
    if _jpeg_region is None:
        return None
    tried, (probe_jpeg, cases) = [], _self_test_cases()
    for path in libjpeg_candidates():
        try:
            _jpeg_region.load(path)
        except OSError as exc:
            tried.append(f"{path}: {exc}")
            continue
        if _self_test_passes(probe_jpeg, cases):
            return path
        tried.append(f"{path}: decodes differently from simplejpeg or fails the test image")
    log.warning("region JPEG decoding off, whole images are decoded (slower): no usable libjpeg-turbo (%s)",
                "; ".join(tried))
    return None


REGION_LIBRARY = _load_region_library()
if REGION_LIBRARY is None:
    _jpeg_region = None
REGION_DECODE = _jpeg_region is not None


def region_decoding_state() -> str:
    """One phrase for reports (rtrain bench, benchmarks/loader.py): which libjpeg-turbo decodes regions."""
    if REGION_LIBRARY is None:
        return "region decoding off (extension not built or no libjpeg-turbo loaded): whole-image decodes"
    return f"region decoding with {os.path.basename(REGION_LIBRARY)}"


class DecodeError(ExpectedError, ValueError):
    """The bytes of a sample are not a decodable image."""


@dataclass(frozen=True)
class SourceImage:
    """Encoded image bytes plus what the header says; `jpeg_fast` selects the libjpeg-turbo path."""

    data: bytes
    width: int
    height: int
    jpeg_fast: bool


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> SourceImage:
    """Read the image size without decoding pixels; refuse an image whose header claims more than
    `max_pixels` (data.max_image_pixels) before any decoder allocates for it: a few hundred bytes can claim
    65500 x 65500 pixels, gigabytes per decode."""
    fast = False
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        fast = colorspace in _FAST_COLORSPACES
    except (ValueError, KeyError):  # KeyError: simplejpeg 1.9 on a sampling factor it has no name for
        pass
    if not fast:
        try:
            with Image.open(io.BytesIO(data), formats=OPENED_FORMATS) as image:
                width, height = image.size
        except Image.DecompressionBombError as exc:  # over twice Pillow's own limit, whatever the recipe says
            raise DecodeError(f"not decoded: {exc} (data.max_image_pixels: {max_pixels:,})") from None
        except Exception as exc:  # Pillow raises many types for garbage input
            raise DecodeError(f"not a readable image ({type(exc).__name__}: {exc})") from exc
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise DecodeError(f"the header claims {width} x {height} = {width * height:,} pixels, over "
                          f"data.max_image_pixels ({max_pixels:,}): not decoded")
    return SourceImage(data, width, height, fast)


def decode_denominator(view: View) -> int:
    """Largest d such that the box, decoded at 1/d scale, still covers the output size."""
    left, top, right, bottom = view.box
    out_h, out_w = view.out_size
    for denominator in FAST_DENOMINATORS:
        if (right - left) >= out_w * denominator and (bottom - top) >= out_h * denominator:
            return denominator
    return 1


class PixelBuffer:
    """Decode output memory reused from sample to sample: a fresh half-megabyte array per image costs page
    faults (the kernel maps and zeroes it) that measured as much as the resize. Owned by one worker."""

    def __init__(self) -> None:
        self._memory = np.empty(0, dtype=np.uint8)

    def at_least(self, nbytes: int) -> np.ndarray:
        if self._memory.size < nbytes:
            self._memory = np.empty(max(nbytes, 2 * self._memory.size), dtype=np.uint8)
        return self._memory


def decode_scaled(source: SourceImage, denominator: int, buffer: PixelBuffer | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) pixels at about 1/denominator of the source size (a view of `buffer` if given)."""
    min_h, min_w = math.ceil(source.height / denominator), math.ceil(source.width / denominator)
    if source.jpeg_fast:
        out = buffer.at_least(3 * min_h * min_w) if buffer is not None else None
        try:
            return simplejpeg.decode_jpeg(source.data, colorspace="RGB", fastdct=FAST_DCT,
                                          fastupsample=FAST_UPSAMPLE, min_height=min_h, min_width=min_w,
                                          buffer=out)
        except ValueError:
            pass  # e.g. a damaged but partly readable file: let Pillow try
    try:
        with Image.open(io.BytesIO(source.data), formats=OPENED_FORMATS) as image:
            if image.format == "JPEG":
                image.draft("RGB", (min_w, min_h))
            return np.array(image.convert("RGB"))
    except Exception as exc:
        raise DecodeError(f"cannot decode image ({type(exc).__name__}: {exc})") from exc


def _box_in_pixels(view: View, source: SourceImage, pixels: np.ndarray) -> tuple[int, int, int, int]:
    return _scaled_box(view, source, pixels.shape[1], pixels.shape[0])


def _scaled_box(view: View, source: SourceImage, width: int, height: int) -> tuple[int, int, int, int]:
    """The view's box in the pixels of the source decoded at width x height."""
    scale_x, scale_y = width / source.width, height / source.height
    left, top, right, bottom = view.box
    x0, y0 = round(left * scale_x), round(top * scale_y)
    return x0, y0, max(x0 + 1, round(right * scale_x)), max(y0 + 1, round(bottom * scale_y))


def cut_box(pixels: np.ndarray, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The box of an (H, W, 3) image as an (h, w, 3) tensor; outside the image is black."""
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = box
    image = torch.from_numpy(pixels)
    if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
        return image[y0:y1, x0:x1]
    canvas = torch.zeros((y1 - y0, x1 - x0, 3), dtype=torch.uint8)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if ix0 < ix1 and iy0 < iy1:
        canvas[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[iy0:iy1, ix0:ix1]
    return canvas


def decode_box(source: SourceImage, view: View, denominator: int, buffer: PixelBuffer) -> torch.Tensor | None:
    """The view's box, decoded alone at 1/denominator scale (region decoding), as an (h, w, 3) tensor with
    packed rows (a view of `buffer`, or a black-padded copy where the box reaches outside); None where the
    extension is missing or refuses the file (the caller then decodes the whole image)."""
    if _jpeg_region is None or not source.jpeg_fast:
        return None
    width, height = math.ceil(source.width / denominator), math.ceil(source.height / denominator)
    x0, y0, x1, y1 = _scaled_box(view, source, width, height)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if ix0 >= ix1 or iy0 >= iy1:
        return torch.zeros((y1 - y0, x1 - x0, 3), dtype=torch.uint8)
    rows, cols = iy1 - iy0, ix1 - ix0
    memory = buffer.at_least(3 * rows * cols)
    try:
        _jpeg_region.decode_region(source.data, denominator, ix0, iy0, ix1, iy1, memory)
    except ValueError:
        return None  # e.g. damaged data: the whole-image path has the fallbacks and the error messages
    inside = torch.from_numpy(memory[:rows * cols * 3].reshape(rows, cols, 3))
    if (x0, y0, x1, y1) == (ix0, iy0, ix1, iy1):
        return inside
    canvas = torch.zeros((y1 - y0, x1 - x0, 3), dtype=torch.uint8)
    canvas[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = inside
    return canvas


def resize_into(region: torch.Tensor, out: torch.Tensor) -> None:
    """(h, w, 3) -> `out` (3, out_h, out_w). torch's vectorized uint8 antialiased resize reads the
    channels_last view of the pixels; when `out` is channels_last memory too (rtrain's batches are), it
    writes there directly, ~40 % faster than into planar memory (no repacking of its RGBA working rows)."""
    chw = region.permute(2, 0, 1)
    if chw.shape == out.shape:
        out.copy_(chw)
    else:
        # F.interpolate(mode="bilinear", antialias=True, align_corners=False) without its Python argument
        # checks, which cost a tenth of the resize itself (tests/unit/test_decode.py compares the two)
        _resize_aa(chw.unsqueeze(0), list(out.shape[1:]), False, None, None, out=out.unsqueeze(0))


def channels_last_image(out_size: tuple[int, int]) -> torch.Tensor:
    """An uninitialized (3, h, w) uint8 tensor stored as (h, w, 3)."""
    return torch.empty((*out_size, 3), dtype=torch.uint8).permute(2, 0, 1)


def apply_lighting(image: torch.Tensor, offset: tuple[float, float, float]) -> torch.Tensor:
    shifted = image.to(torch.float32) + torch.tensor(offset, dtype=torch.float32).view(3, 1, 1)
    return shifted.round_().clamp_(0, 255).to(torch.uint8)


def render(source: SourceImage, view: View, buffer: PixelBuffer | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The view of the source as a (3, out_h, out_w) uint8 tensor: written into `out` when given (a batch
    slot), else a new channels_last tensor; never a view of `buffer`."""
    denominator = decode_denominator(view)
    region = decode_box(source, view, denominator, buffer) if buffer is not None else None
    if region is None:
        pixels = decode_scaled(source, denominator, buffer)
        region = cut_box(pixels, _box_in_pixels(view, source, pixels))
    if out is None:
        out = channels_last_image(view.out_size)
    elif tuple(out.shape) != (3, *view.out_size):
        raise ValueError(f"render: out is {tuple(out.shape)}, the view makes (3, {view.out_size[0]}, "
                         f"{view.out_size[1]})")
    resize_into(region, out)
    if view.flip:  # after the resize, as torchvision's RandomHorizontalFlip after RandomResizedCrop
        out.copy_(out.flip(2))
    if view.lighting is not None:
        out.copy_(apply_lighting(out, view.lighting))
    return out
