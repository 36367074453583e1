"""Each real-world quirk ends where data_prep's policy says (data_prep.quirks)."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from data_prep.quirks import ImageOptions, jpeg_decode_error, jpeg_structure_error, reason_category, sanitize_image
from data_prep.synthetic import SyntheticSpec, jpeg_bytes, quirk_bytes, synthetic_image

SPEC = SyntheticSpec(image_size=(96, 64))


def _quirk(kind: str) -> bytes:
    return quirk_bytes(kind, np.random.default_rng(3), SPEC)


def _decoded(jpeg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpeg))
    image.load()
    return image


def test_plain_rgb_jpeg_passes_through_byte_for_byte():
    raw = jpeg_bytes(synthetic_image(np.random.default_rng(0), 96, 64), 90)
    outcome = sanitize_image(raw, ImageOptions())
    assert outcome.jpeg == raw and outcome.conversion is None and not outcome.grayscale


def test_cmyk_jpeg_becomes_rgb_jpeg():
    raw = _quirk("cmyk")
    assert Image.open(io.BytesIO(raw)).mode == "CMYK"  # really a CMYK JPEG
    outcome = sanitize_image(raw, ImageOptions())
    assert outcome.conversion == "cmyk_to_rgb"
    image = _decoded(outcome.jpeg)
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (96, 64)


def test_png_named_jpeg_becomes_jpeg():
    raw = _quirk("png_as_jpeg")
    assert raw.startswith(b"\x89PNG")
    outcome = sanitize_image(raw, ImageOptions())
    assert outcome.conversion == "png_to_jpeg"
    assert _decoded(outcome.jpeg).format == "JPEG" and _decoded(outcome.jpeg).mode == "RGB"


def test_grayscale_jpeg_is_kept_and_flagged():
    raw = _quirk("grayscale")
    outcome = sanitize_image(raw, ImageOptions())
    assert outcome.jpeg == raw and outcome.grayscale and outcome.conversion is None
    assert _decoded(outcome.jpeg).convert("RGB").size == (96, 64)  # what the loader does


def test_exif_orientation_is_applied_and_removed():
    raw = _quirk("exif_rotated")
    outcome = sanitize_image(raw, ImageOptions())
    assert outcome.conversion == "exif_orientation"
    image = _decoded(outcome.jpeg)
    assert image.size == (64, 96)  # rotated by 90 degrees: width and height swap
    assert image.getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize("kind, category", [("truncated", "truncated JPEG"), ("zero_byte", "zero-byte file"),
                                            ("text_file", "not an image")])
def test_broken_files_are_quarantined_with_reason(kind, category):
    outcome = sanitize_image(_quirk(kind), ImageOptions())
    assert outcome.jpeg is None
    assert reason_category(outcome.quarantine_reason) == category


@pytest.mark.parametrize("keep_fraction", [0.3, 0.5, 0.9, 0.99])
def test_fast_reduced_scale_check_catches_truncation(keep_fraction):
    raw = jpeg_bytes(synthetic_image(np.random.default_rng(1), 500, 375), 90)
    assert jpeg_decode_error(raw) is None
    cut = raw[: int(len(raw) * keep_fraction)]
    assert reason_category(jpeg_decode_error(cut)) == "truncated JPEG"


def test_corrupt_png_is_quarantined():
    raw = _quirk("png_as_jpeg")
    outcome = sanitize_image(raw[: len(raw) // 2], ImageOptions())
    assert outcome.jpeg is None and "PNG" in outcome.quarantine_reason


def test_max_side_resizes_large_and_keeps_small():
    large = jpeg_bytes(synthetic_image(np.random.default_rng(2), 500, 375), 95)
    small = jpeg_bytes(synthetic_image(np.random.default_rng(2), 120, 90), 95)
    options = ImageOptions(max_side=160, quality=80)
    resized = sanitize_image(large, options)
    assert resized.conversion == "max_side_resize" and _decoded(resized.jpeg).size == (160, 120)
    assert sanitize_image(small, options).jpeg == small


def test_refuses_to_verify_when_truncated_loading_is_enabled(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        sanitize_image(_quirk("truncated"), ImageOptions(check="decode"))


def test_image_options_are_validated():
    with pytest.raises(ValueError, match="quality"):
        ImageOptions(quality=0)
    with pytest.raises(ValueError, match="max_side"):
        ImageOptions(max_side=2)


def _variants():
    image = synthetic_image(np.random.default_rng(4), 200, 150)
    exif = Image.Exif()
    exif[0x010F] = "camera"
    return {
        "baseline": jpeg_bytes(image, 90),
        "progressive": jpeg_bytes(image, 90, progressive=True),
        "restart_markers": jpeg_bytes(image, 90, restart_marker_blocks=4),
        "exif_and_icc": jpeg_bytes(image, 90, exif=exif.tobytes(), icc_profile=b"\0" * 3000),
        "grayscale": jpeg_bytes(image.convert("L"), 90),
        "cmyk": jpeg_bytes(image.convert("CMYK"), 90),
    }


@pytest.mark.parametrize("variant", sorted(_variants()))
def test_structure_check_accepts_valid_jpegs_and_catches_any_truncation(variant):
    raw = _variants()[variant]
    assert jpeg_structure_error(raw) is None
    for keep_fraction in (0.1, 0.5, 0.9, 0.999):
        cut = raw[: int(len(raw) * keep_fraction)]
        assert reason_category(jpeg_structure_error(cut)) in ("truncated JPEG", "corrupt JPEG")
        assert jpeg_decode_error(cut) is not None  # the decode check agrees


def test_structure_check_mode_sorts_quirks_like_decode_mode():
    for kind in ("cmyk", "grayscale", "exif_rotated", "truncated"):
        raw = _quirk(kind)
        fast, slow = sanitize_image(raw, ImageOptions(check="structure")), sanitize_image(raw, ImageOptions())
        assert (fast.jpeg, fast.conversion, fast.grayscale) == (slow.jpeg, slow.conversion, slow.grayscale)
        assert (fast.quarantine_reason is None) == (slow.quarantine_reason is None)
