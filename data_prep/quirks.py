"""Turn one source file into JPEG bytes the loader can always decode, or a reason to quarantine it.

Policy (the loader, rtrain.data, relies on it):

- A JPEG in RGB or grayscale, without an EXIF rotation and within ``max_side``, is passed through byte
  for byte. Grayscale stays a 1-channel JPEG: the loader converts every decoded sample to RGB.
- CMYK/YCCK JPEGs are converted to an RGB JPEG (counted as ``cmyk_to_rgb``). PNG, GIF, BMP, WebP, ...
  bytes under a .JPEG name become an RGB (or grayscale) JPEG (``png_to_jpeg``, ``gif_to_jpeg``, ...).
- EXIF orientation: the transpose is applied HERE and the image re-encoded without EXIF (counted as
  ``exif_orientation``). Shards therefore never carry a rotation tag and loaders never read EXIF.
- With ``max_side`` set, a larger image is resized so its longer side is ``max_side`` and re-encoded at
  ``quality`` (``max_side_resize``), as FFCV does; smaller ones keep their original bytes.
- Every JPEG is verified (default ``check="structure"``): libjpeg parses the header and every scan is
  walked to the end-of-image marker, so truncated, zero-byte, malformed and non-JPEG files are caught at a
  fraction of a decode's cost (benchmarks/RESULTS.md). ``check="decode"`` decodes every JPEG at 1/8 scale
  instead: libjpeg still consumes every entropy-coded byte, so it also catches the rare fatal error hidden
  inside scan data, at about half a full decode. libjpeg warnings that PIL tolerates (extraneous bytes, ...)
  are re-checked with PIL, so we accept exactly what PIL accepts. `python -m data_prep.verify` always
  decodes every sample.
- Zero-byte, truncated, corrupt and non-image files are quarantined with a reason of the form
  ``"<category> (<detail>)"``; the category is what summaries group by.
- An image whose header claims more than ``max_image_pixels`` (``--max-image-pixels``, the loader's
  data.max_image_pixels default) is quarantined before anything decodes it (``too many pixels``); only the
  raster formats in OPENED_FORMATS are opened (no EPS, PDF, ... plugins); and no single file, whatever
  Pillow raises for it, stops a build: it is quarantined with the reason.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from rtrain.data.decode import DEFAULT_MAX_IMAGE_PIXELS

JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION_TAG = 0x0112
EXIF_HEADER = b"Exif\x00\x00"
PLAIN_COLORSPACES = ("YCbCr", "Gray", "RGB")
APP1, START_OF_SCAN, END_OF_IMAGE = 0xE1, 0xDA, 0xD9
JPEG_CHECKS = ("decode", "structure")
PASSTHROUGH_MODES = ("RGB", "L")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# What a source file may be: JPEG, and the raster formats that get converted to it.
OPENED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


@dataclass(frozen=True)
class ImageOptions:
    """How images are checked and written: ``max_side`` None keeps the original size (pass-through).

    ``check``: "structure" (default) parses the header with libjpeg and walks every scan to the
    end-of-image marker -- it catches truncated and malformed files at a fraction of a decode's cost, but
    not the rare fatal errors hidden inside scan data; "decode" decodes every JPEG at 1/8 scale.
    """

    max_side: int | None = None
    quality: int = 90
    check: str = "structure"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.check not in JPEG_CHECKS:
            raise ValueError(f"check must be one of {JPEG_CHECKS}, got {self.check!r}")
        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"max_side must be >= 8 pixels, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")


@dataclass(frozen=True)
class ImageOutcome:
    """Exactly one of ``jpeg`` / ``quarantine_reason`` is set; ``conversion`` names what was changed."""

    jpeg: bytes | None
    conversion: str | None = None
    quarantine_reason: str | None = None
    grayscale: bool = False


def reason_category(reason: str) -> str:
    return reason.split(" (", 1)[0]


def _require_strict_pil() -> None:
    # Someone in this process enabling truncated loading would let broken files through silently.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: data_prep refuses to verify images")


def _pil_error_reason(kind: str, exc: BaseException) -> str:
    detail = str(exc) or type(exc).__name__
    if "truncated" in detail:
        return f"truncated {kind} ({detail})"
    return f"corrupt {kind} ({detail})"


def jpeg_decode_error(raw: bytes) -> str | None:
    """None when the JPEG decodes completely (checked at 1/8 scale), else the quarantine reason."""
    _require_strict_pil()
    try:
        simplejpeg.decode_jpeg(raw, min_height=1, min_width=1, min_factor=8)
        return None
    except ValueError:
        pass  # strict libjpeg-turbo also fails on harmless warnings; PIL has the final word
    try:
        with Image.open(io.BytesIO(raw), formats=OPENED_FORMATS) as image:
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None
    except DECODE_ERRORS as exc:
        return _pil_error_reason("JPEG", exc)


def _end_of_scan(raw: bytes, position: int) -> int:
    """Offset of the marker that ends the entropy-coded data starting at ``position``; -1 if none."""
    while True:
        position = raw.find(b"\xff", position)
        if position < 0 or position + 1 >= len(raw):
            return -1
        following = raw[position + 1]
        if following == 0xFF:  # fill byte: the marker starts one later
            position += 1
        elif following == 0x00 or 0xD0 <= following <= 0xD7:  # stuffed 0xFF or restart marker
            position += 2
        else:
            return position


def jpeg_structure_error(raw: bytes) -> str | None:
    """None when libjpeg parses the header and every scan runs to an end-of-image marker."""
    try:
        simplejpeg.decode_jpeg_header(raw)
    except ValueError as exc:
        return f"corrupt JPEG ({exc})"
    position = 2
    while position + 2 <= len(raw):
        if raw[position] != 0xFF:
            return f"corrupt JPEG (no marker at byte {position})"
        marker = raw[position + 1]
        if marker == END_OF_IMAGE:
            return None
        if marker == 0xFF or 0xD0 <= marker <= 0xD7:
            position += 1 if marker == 0xFF else 2
            continue
        position += 2 + int.from_bytes(raw[position + 2 : position + 4], "big")
        if marker == START_OF_SCAN:
            position = _end_of_scan(raw, position)
            if position < 0:
                return "truncated JPEG (scan data ends before the end-of-image marker)"
    return "truncated JPEG (no end-of-image marker)"


def sanitize_image(raw: bytes, options: ImageOptions) -> ImageOutcome:
    if not raw:
        return ImageOutcome(None, quarantine_reason="zero-byte file")
    too_many = _pixel_budget_error(raw, options.max_image_pixels)
    if too_many is not None:
        return ImageOutcome(None, quarantine_reason=too_many)
    try:
        if raw.startswith(JPEG_MAGIC):
            return _sanitize_jpeg(raw, options)
        return _convert_other_format(raw, options)
    except DECODE_ERRORS as exc:  # one file never stops a build: whatever its header does to Pillow
        return ImageOutcome(None, quarantine_reason=_pil_error_reason("image", exc))


def _pixel_budget_error(raw: bytes, max_pixels: int) -> str | None:
    """The quarantine reason when the header claims more than `max_pixels`; None when it does not, or when
    the header cannot be read (the checks that follow name that)."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(raw)
    except ValueError:
        try:
            with Image.open(io.BytesIO(raw), formats=OPENED_FORMATS) as image:
                width, height = image.size
        except Image.DecompressionBombError as exc:
            return f"too many pixels ({exc})"
        except Exception:  # noqa: BLE001 - unreadable: the format checks quarantine it with their reason
            return None
    if width * height > max_pixels:
        return f"too many pixels ({width} x {height} = {width * height:,}, over --max-image-pixels {max_pixels:,})"
    return None


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except DECODE_ERRORS:
        return 1  # an unreadable EXIF block carries no usable rotation either


def _target_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _header_has_exif(raw: bytes) -> bool:
    """Walks the marker segments before the first scan; True also when the header is odd (slow path)."""
    position = 2
    while position + 4 <= len(raw):
        if raw[position] != 0xFF:
            return True
        marker = raw[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == START_OF_SCAN:
            return False
        if marker == APP1 and raw[position + 4 : position + 10] == EXIF_HEADER:
            return True
        position += 2 + int.from_bytes(raw[position + 2 : position + 4], "big")
    return True


def _is_plain_jpeg(raw: bytes, options: ImageOptions) -> tuple[bool, bool]:
    """(pass through as is, grayscale), from libjpeg's header parse: no PIL object on the hot path."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(raw)
    except ValueError:
        return False, False
    # An EXIF block may hold a rotation: any file with one takes the slow path that reads it.
    plain = colorspace in PLAIN_COLORSPACES and not _header_has_exif(raw)
    return plain and _target_size((width, height), options.max_side) is None, colorspace == "Gray"


def _sanitize_jpeg(raw: bytes, options: ImageOptions) -> ImageOutcome:
    error = jpeg_decode_error(raw) if options.check == "decode" else jpeg_structure_error(raw)
    if error is not None:
        return ImageOutcome(None, quarantine_reason=error)
    plain, grayscale = _is_plain_jpeg(raw, options)
    if plain:
        return ImageOutcome(raw, grayscale=grayscale)
    with Image.open(io.BytesIO(raw), formats=OPENED_FORMATS) as image:
        mode, size, orientation = image.mode, image.size, _orientation(image)
        target = _target_size(size, options.max_side)
        changes = []
        if mode not in PASSTHROUGH_MODES:
            changes.append(f"{mode.lower()}_to_rgb")
        if orientation != 1:
            changes.append("exif_orientation")
        if target is not None:
            changes.append("max_side_resize")
        if not changes:
            return ImageOutcome(raw, grayscale=mode == "L")
        if target is not None:
            image.draft(mode, target)  # DCT-domain downscale first: much cheaper than decoding full size
        return _reencode(image, "+".join(changes), "JPEG", options)


def _convert_other_format(raw: bytes, options: ImageOptions) -> ImageOutcome:
    _require_strict_pil()
    try:
        image = Image.open(io.BytesIO(raw), formats=OPENED_FORMATS)
    except UnidentifiedImageError:
        return ImageOutcome(None, quarantine_reason=f"not an image (starts with {raw[:12]!r})")
    except DECODE_ERRORS as exc:
        return ImageOutcome(None, quarantine_reason=_pil_error_reason("image", exc))
    with image:
        kind = image.format or "image"
        try:
            image.load()
        except DECODE_ERRORS as exc:
            return ImageOutcome(None, quarantine_reason=_pil_error_reason(kind, exc))
        return _reencode(image, f"{kind.lower()}_to_jpeg", kind, options)


def _reencode(image: Image.Image, conversion: str, kind: str, options: ImageOptions) -> ImageOutcome:
    try:
        upright = ImageOps.exif_transpose(image)
        grayscale = upright.mode in GRAYSCALE_MODES
        pixels = upright.convert("L" if grayscale else "RGB")
        target = _target_size(pixels.size, options.max_side)
        if target is not None:
            pixels = pixels.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        icc = image.info.get("icc_profile") if image.mode in PASSTHROUGH_MODES else None
        buffer = io.BytesIO()
        pixels.save(buffer, "JPEG", quality=options.quality, icc_profile=icc)
    except DECODE_ERRORS as exc:
        return ImageOutcome(None, quarantine_reason=_pil_error_reason(kind, exc))
    return ImageOutcome(buffer.getvalue(), conversion=conversion, grayscale=grayscale)
