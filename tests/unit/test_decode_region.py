"""Region decoding (the optional C extension rtrain.data._jpeg_region) gives the same pixels as decoding the
whole image and cutting the box out, for every chroma subsampling, scale, grayscale, boxes touching the
edges or reaching outside; files it refuses fall back to the whole-image path."""

from __future__ import annotations

import ctypes
import io
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image
from test_loader_fixtures import photo_jpeg, photo_pixels

from rtrain.data import decode
from rtrain.data.decode import PixelBuffer, probe, render
from rtrain.data.transforms import View, rrc_box

pytestmark = pytest.mark.skipif(not decode.REGION_DECODE,
                                reason="rtrain.data._jpeg_region was not built (no libjpeg headers)")


def encoded(seed: int, width: int, height: int, subsampling: int, gray: bool = False,
            progressive: bool = False) -> bytes:
    image = Image.fromarray(photo_pixels(seed, width, height, 16, 6))
    out = io.BytesIO()
    (image.convert("L") if gray else image).save(out, "JPEG", quality=92, subsampling=subsampling,
                                                 progressive=progressive)
    return out.getvalue()


def whole(data: bytes, denominator: int) -> np.ndarray:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True,
                                  min_height=math.ceil(height / denominator), min_width=math.ceil(width / denominator))


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # Pillow: 4:4:4, 4:2:2, 4:2:0
@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("progressive", [False, True])
def test_region_pixels_equal_the_whole_decode(subsampling: int, gray: bool, progressive: bool) -> None:
    data = encoded(subsampling, 333, 251, subsampling, gray, progressive)
    memory = np.empty(333 * 251 * 3, np.uint8)
    rng = random.Random(subsampling)
    for denominator in (1, 2, 4, 8):
        full = whole(data, denominator)
        height, width = full.shape[:2]
        boxes = [(0, 0, width, height), (width - 1, height - 1, width, height), (0, 0, 1, 1)]
        for _ in range(20):
            x0, y0 = rng.randrange(width), rng.randrange(height)
            boxes.append((x0, y0, rng.randrange(x0 + 1, width + 1), rng.randrange(y0 + 1, height + 1)))
        for x0, y0, x1, y1 in boxes:
            memory[:] = 7
            decode._jpeg_region.decode_region(data, denominator, x0, y0, x1, y1, memory)
            rows, cols = y1 - y0, x1 - x0
            region = memory[:rows * cols * 3].reshape(rows, cols, 3)
            np.testing.assert_array_equal(region, full[y0:y1, x0:x1])
            assert (memory[rows * cols * 3:] == 7).all()  # nothing written past the packed region


def test_render_is_identical_with_and_without_region_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    views = []
    for width, height, in ((500, 375), (375, 500), (1200, 900), (120, 90)):
        data = photo_jpeg(width, width, height, cell=16, noise=4)
        source = probe(data)
        for _ in range(8):
            box = rrc_box(rng, width, height, (0.08, 1.0), (3 / 4, 4 / 3))
            views.append((source, View(box, (224, 224), flip=rng.random() < 0.5)))
        views.append((source, View((-4, -4, 28, 28), (32, 32))))  # CIFAR-style padding: outside is black
        views.append((source, View((width - 20, height - 20, width + 12, height + 12), (32, 32), flip=True)))
    with_region = [render(source, view, PixelBuffer()) for source, view in views]
    monkeypatch.setattr(decode, "_jpeg_region", None)
    without = [render(source, view, PixelBuffer()) for source, view in views]
    for a, b in zip(with_region, without):
        assert torch.equal(a, b)


def test_render_into_a_batch_slot_equals_render_alone() -> None:
    rng = random.Random(3)
    data = photo_jpeg(9, 500, 375, cell=16, noise=4)
    source = probe(data)
    batches = (torch.zeros(6, 224, 224, 3, dtype=torch.uint8).permute(0, 3, 1, 2),  # rtrain's channels_last
               torch.zeros(6, 3, 224, 224, dtype=torch.uint8))
    for slot in range(6):
        view = View(rrc_box(rng, 500, 375, (0.08, 1.0), (3 / 4, 4 / 3)), (224, 224), flip=slot % 2 == 0,
                    lighting=(5.0, -3.0, 1.5) if slot == 4 else None)
        alone = render(source, view, PixelBuffer())
        for batch in batches:
            render(source, view, PixelBuffer(), out=batch[slot])
            assert torch.equal(batch[slot], alone)
    assert torch.equal(batches[0], batches[1])


def test_rendered_image_never_aliases_the_reused_buffer() -> None:
    data = photo_jpeg(1, 64, 48)
    buffer = PixelBuffer()
    first = render(probe(data), View((8, 8, 40, 40), (32, 32)), buffer)  # no resize, no flip: a plain cut
    kept = first.clone()
    render(probe(photo_jpeg(2, 64, 48)), View((0, 0, 64, 48), (48, 64)), buffer)
    assert torch.equal(first, kept)


def test_refused_files_fall_back_to_the_whole_image_path() -> None:
    cmyk = io.BytesIO()
    Image.fromarray(photo_pixels(3, 80, 60)).convert("CMYK").save(cmyk, "JPEG", quality=90)
    truncated = photo_jpeg(4, 200, 150)[:-2000]
    memory = np.empty(200 * 150 * 3, np.uint8)
    for data, box in ((cmyk.getvalue(), (0, 0, 80, 60)), (truncated, (0, 0, 200, 150))):
        with pytest.raises(ValueError):
            decode._jpeg_region.decode_region(data, 1, *box, memory)
    decode._jpeg_region.decode_region(truncated, 1, 0, 0, 200, 20, memory)  # its intact top
    image = render(probe(cmyk.getvalue()), View((0, 0, 80, 60), (30, 40)), PixelBuffer())
    assert image.shape == (3, 30, 40) and image.float().mean() > 10
    with pytest.raises(ValueError, match="outside"):
        decode._jpeg_region.decode_region(photo_jpeg(5, 40, 30), 1, 0, 0, 41, 30, memory)
    with pytest.raises(ValueError, match="too small"):
        decode._jpeg_region.decode_region(photo_jpeg(5, 40, 30), 1, 0, 0, 40, 30, np.empty(10, np.uint8))


def loaded_library(**env: str) -> str:
    code = "from rtrain.data import decode; print(decode.REGION_LIBRARY, decode.REGION_DECODE)"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_library_is_chosen_and_checked_at_import() -> None:
    candidates = decode.libjpeg_candidates()
    assert candidates[-1] == "libjpeg.so.62"  # the system's last
    bundled = [path for path in candidates if "pillow.libs" in path.lower()]
    if bundled:  # Pillow's wheel: its libjpeg-turbo 3.x first
        assert decode.REGION_LIBRARY == bundled[0]
    assert loaded_library(RTRAIN_LIBJPEG=decode.REGION_LIBRARY) == f"{decode.REGION_LIBRARY} True"
    assert loaded_library(RTRAIN_LIBJPEG="/no/such/libjpeg.so") == "None False"  # forced and missing: off
    assert loaded_library(RTRAIN_LIBJPEG="libc.so.6") == "None False"  # opens, has no jpeg_* functions
    assert decode._jpeg_region.JPEG_LIB_VERSION in (62, 80)  # the ABI of the headers it was built with
    try:
        ctypes.CDLL("libjpeg.so.62")
    except OSError:
        return
    assert loaded_library(RTRAIN_LIBJPEG="libjpeg.so.62") == "libjpeg.so.62 True"
