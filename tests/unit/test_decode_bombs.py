"""Image bombs: a few hundred bytes whose header claims 16000 x 16000 (baseline and progressive JPEG, PNG) are
refused from the header, before any decoder allocates for them (data.max_image_pixels), in every decode path:
the loader's (simplejpeg, region decoding, Pillow fallback) and the whole-image one. Only JPEG and PNG are
opened. A bomb is a bad sample like any other: skipped and counted, or one line naming shard and key."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_loader_fixtures import small_cfg, write_split

from rtrain.data import SampleError, WholeImageLoader, build_loader
from rtrain.data.decode import DEFAULT_MAX_IMAGE_PIXELS, DecodeError, probe

CLAIM = (16000, 16000)


def _with_claimed_size(data: bytes, markers: tuple[bytes, ...], width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0/SOF2) claims width x height; the scan data stays the small image's."""
    for marker in markers:
        at = data.find(marker)
        if at >= 0:
            patched = bytearray(data)
            patched[at + 5:at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
            return bytes(patched)
    raise AssertionError("no frame header")


def jpeg_bomb(progressive: bool = False) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(buffer, "JPEG", progressive=progressive)
    return _with_claimed_size(buffer.getvalue(), (b"\xff\xc2" if progressive else b"\xff\xc0",), *CLAIM)


def png_bomb() -> bytes:
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", *CLAIM)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


BOMBS = {"baseline jpeg": lambda: jpeg_bomb(), "progressive jpeg": lambda: jpeg_bomb(True), "png": png_bomb}


@pytest.mark.parametrize("kind", list(BOMBS))
def test_probe_refuses_a_bomb_from_its_header(kind: str) -> None:
    data = BOMBS[kind]()
    assert len(data) < 1000
    claims = r"16000 x 16000 = 256,000,000 pixels, over " if kind != "png" else r"256000000 pixels.*\("
    with pytest.raises(DecodeError, match=claims + r"data.max_image_pixels"):
        probe(data)
    if kind != "png":  # Pillow's own limit (twice its MAX_IMAGE_PIXELS) still refuses a PNG this size
        assert probe(data, max_pixels=16000 * 16000).width == 16000  # the limit is the recipe's to raise


def test_other_formats_are_never_opened() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "BMP")
    with pytest.raises(DecodeError, match="not a readable image"):
        probe(buffer.getvalue())


def test_refusing_costs_no_memory_in_a_fresh_process() -> None:
    """Peak memory of a fresh process that probes and decodes a progressive bomb as the loader does: with the
    limit no more than probing nothing; with the limit raised past the claim, libjpeg's allocation shows."""
    # VmHWM, the peak of this process's own memory: ru_maxrss would start at the forking parent's size
    code = ("import sys; from test_decode_bombs import jpeg_bomb; "
            "from rtrain.data.decode import probe, decode_scaled, DecodeError\n"
            "try: decode_scaled(probe(jpeg_bomb(True), int(sys.argv[1])), 8) if sys.argv[1] != '0' else None\n"
            "except DecodeError: pass\n"
            "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))")
    peaks = {}
    for what, limit in (("nothing", 0), ("limited", DEFAULT_MAX_IMAGE_PIXELS), ("unlimited", 10**12)):
        done = subprocess.run([sys.executable, "-c", code, str(limit)], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True, timeout=120)
        peaks[what] = int(done.stdout.split()[-1])  # KiB
    assert peaks["limited"] - peaks["nothing"] < 50_000, peaks
    assert peaks["unlimited"] - peaks["nothing"] > 200_000, peaks  # what the limit saves (~750 MB measured)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bomb_in_a_shard_is_a_bad_sample(tmp_path: Path, workers: int) -> None:
    write_split(tmp_path, "train", [4, 4], label_is_id=True, payloads={1: jpeg_bomb(True), 6: png_bomb()})
    loader = build_loader(small_cfg(tmp_path, on_bad_sample="skip", num_workers=workers), "train", rank=0,
                          world_size=1, batch_size=4, seed=0, train=True)
    labels = sorted(i for _, batch in loader for i in batch.tolist())
    assert labels == [0, 2, 3, 4, 5, 7]
    assert loader.stats == {"skipped_samples": 2, "bad_samples": 2, "skipped_shards": 0}
    strict = build_loader(small_cfg(tmp_path, on_bad_sample="raise", num_workers=workers), "train", rank=0,
                          world_size=1, batch_size=4, seed=0, train=False)
    with pytest.raises(SampleError, match=r"train-000000\.tar: sample 's000001'.*max_image_pixels"):
        list(strict)


def test_the_whole_image_loader_refuses_a_bomb_too(tmp_path: Path) -> None:
    write_split(tmp_path, "val", [3], label_is_id=True, payloads={2: jpeg_bomb()})
    loader = WholeImageLoader(small_cfg(tmp_path, on_bad_sample="raise", max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS),
                              "val", rank=0, world_size=1, batch_size=3, min_shorter_side=32)
    with pytest.raises(SampleError, match=r"s000002.*max_image_pixels"):
        list(loader)


@pytest.mark.parametrize("kind", list(BOMBS))
@pytest.mark.parametrize("max_side", [None, 64])  # with --max-side the image is opened for a resize
def test_data_prep_quarantines_a_bomb_before_decoding_it(kind: str, max_side: int | None) -> None:
    from data_prep.quirks import ImageOptions, reason_category, sanitize_image

    outcome = sanitize_image(BOMBS[kind](), ImageOptions(max_side=max_side))
    assert outcome.jpeg is None and reason_category(outcome.quarantine_reason) == "too many pixels"
    assert "256" in outcome.quarantine_reason


def test_data_prep_never_stops_on_one_file() -> None:
    """Formats outside the list are not opened, and whatever Pillow raises for a file quarantines it."""
    from data_prep.quirks import ImageOptions, sanitize_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert sanitize_image(eps, ImageOptions()).quarantine_reason.startswith("not an image")
    exif_bomb = jpeg_bomb()  # an EXIF block sends a JPEG down the slow path that opens it with Pillow
    exif = b"\xff\xe1\x00\x10Exif\x00\x00" + b"\0" * 8
    outcome = sanitize_image(exif_bomb[:2] + exif + exif_bomb[2:], ImageOptions(max_image_pixels=10**12))
    assert outcome.jpeg is None and outcome.quarantine_reason


def test_a_header_simplejpeg_cannot_name_is_not_a_crash() -> None:
    """Luma sampling 1x4 (found by a review that fuzzed the header): simplejpeg 1.9's header reader raises
    KeyError; probe falls back to Pillow or names the image as unreadable."""
    import simplejpeg

    data = bytearray(simplejpeg.encode_jpeg(np.zeros((64, 48, 3), np.uint8), colorsubsampling="444"))
    data[data.find(b"\xff\xc0") + 11] = 0x14
    try:
        probe(bytes(data))
    except DecodeError:
        pass
