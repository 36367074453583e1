"""The paper's testing modes against hand-computed references on a tiny fully-convolutional net with fixed
weights: its class scores are linear in the mean of the pixels (logits = W0 . mean of x[..., :-1] +
W1 . mean of x[..., 1:] + b, a 1x2 conv then the global average pool), so each view's scores are computed here
with numpy slicing, independently of the engine. The 1x2 kernel makes mirrored views score differently.
Top-5 is checked with 7 classes and labels placed at chosen ranks of the reference scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision_peer import import_torchvision

from rtrain.config import PrecisionConfig
from rtrain.engine.eval_views import (
    PAPER_SCALES,
    TenCropSquare,
    fitted_square,
    scales_for,
    scales_note,
    shorter_side_size,
    ten_crop_boxes,
    ten_crop_square,
    ten_crops,
)
from rtrain.engine.evaluate import EVAL_MODES, evaluate
from rtrain.engine.step import Normalizer

CLASSES = 7
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
CPU = torch.device("cpu")
# label of image i = the class at rank LABEL_RANKS[i] of its reference scores: hit, top-5 hit, miss, top-5 hit
LABEL_RANKS = (0, 2, 6, 4)


def fixed_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return (rng.normal(size=(CLASSES, 3)), rng.normal(size=(CLASSES, 3)), rng.normal(size=CLASSES))


def tiny_net() -> nn.Module:
    w0, w1, b = fixed_weights()
    conv = nn.Conv2d(3, CLASSES, kernel_size=(1, 2))
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(np.stack([w0, w1], axis=-1)[:, :, None, :], dtype=torch.float32))
        conv.bias.copy_(torch.tensor(b, dtype=torch.float32))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def normalized(image: np.ndarray) -> np.ndarray:
    """uint8 (3, H, W) -> float64 (x / 255 - mean) / std."""
    return (image / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]


def view_logits(view: np.ndarray) -> np.ndarray:
    w0, w1, b = fixed_weights()
    return w0 @ view[:, :, :-1].mean(axis=(1, 2)) + w1 @ view[:, :, 1:].mean(axis=(1, 2)) + b


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def images_of(sizes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def labels_and_expected(scores: list[np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
    """Labels at LABEL_RANKS of each image's reference scores, and the metrics they must give."""
    labels = [int(np.argsort(-s)[rank]) for s, rank in zip(scores, LABEL_RANKS)]
    nll = np.mean([-np.log(s[label]) for s, label in zip(scores, labels)])
    expected = {"top1": 0.25, "top5": 0.75, "top1_error": 0.75, "top5_error": 0.25, "loss": nll, "samples": 4}
    return torch.tensor(labels), expected


def torchvision_resize():
    import_torchvision()
    from torchvision.transforms.v2 import functional

    return functional.resize


def run(mode: str, batch, labels, **options) -> dict[str, float]:
    norm = Normalizer(MEAN, STD, CPU)
    return evaluate(tiny_net(), [(batch, labels)], norm, PrecisionConfig(), mode=mode, **options)


def check(result: dict[str, float], expected: dict[str, float]) -> None:
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-5), key


def test_center_scores_the_image_as_delivered():
    images = images_of([(6, 6)] * 4)
    scores = [softmax(view_logits(normalized(im.numpy()))) for im in images]
    labels, expected = labels_and_expected(scores)
    check(run("center", torch.stack(images), labels), expected)


def test_ten_crop_averages_the_posteriors_of_five_patches_and_their_mirrors():
    images = images_of([(6, 9)] * 4)
    boxes = [(0, 0, 4, 4), (5, 0, 9, 4), (0, 2, 4, 6), (5, 2, 9, 6), (2, 1, 6, 5)]  # by hand, crop 4 of 6x9
    scores = []
    for image in images:
        x = normalized(image.numpy())
        patches = [x[:, top:bottom, left:right] for left, top, right, bottom in boxes]
        posteriors = [softmax(view_logits(p)) for p in patches + [p[:, :, ::-1] for p in patches]]
        scores.append(np.mean(posteriors, axis=0))
    labels, expected = labels_and_expected(scores)
    check(run("ten_crop", torch.stack(images), labels, crop=4), expected)
    x = normalized(images[0].numpy())
    patches = [x[:, top:bottom, left:right] for left, top, right, bottom in boxes]
    mean_logits = np.mean([view_logits(p) for p in patches + [p[:, :, ::-1] for p in patches]], axis=0)
    assert not np.allclose(softmax(mean_logits), scores[0], rtol=1e-3)  # averaging logits would differ


def test_multi_scale_runs_the_whole_image_and_its_mirror_at_each_shorter_side():
    resize = torchvision_resize()  # the reference Resize(int)
    images = images_of([(6, 9), (9, 6), (7, 7), (6, 9)], seed=1)
    scales = [6, 4, 10]
    scores = []
    for image in images:
        x = torch.tensor(normalized(image.numpy()), dtype=torch.float32)
        posteriors = []
        for scale in scales:
            view = resize(x, [scale], antialias=True).double().numpy()
            posteriors += [softmax(view_logits(view)), softmax(view_logits(view[:, :, ::-1]))]
        scores.append(np.mean(posteriors, axis=0))
    labels, expected = labels_and_expected(scores)
    check(run("multi_scale", images, labels, scales=scales), expected)


def test_multi_scale_at_the_native_size_needs_no_resize():
    images = images_of([(6, 9), (9, 6), (6, 9), (9, 6)], seed=2)
    scores = [np.mean([softmax(view_logits(v)), softmax(view_logits(v[:, :, ::-1]))], axis=0)
              for v in (normalized(im.numpy()) for im in images)]
    labels, expected = labels_and_expected(scores)
    check(run("multi_scale", images, labels, scales=[6]), expected)


class ShapeRecorder(nn.Module):
    """Records the (H, W) of every batch it sees; scores all-equal, so any label is a top-1 hit."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, int, int]] = []

    def forward(self, x):
        self.seen.append((x.shape[0], *x.shape[-2:]))
        return torch.zeros(x.shape[0], CLASSES)


def test_multi_scale_keeps_the_aspect_ratio_and_groups_equal_sizes():
    recorder = ShapeRecorder()
    images = images_of([(30, 40), (40, 30), (30, 40)])
    evaluate(recorder, [(images, torch.zeros(3, dtype=torch.int64))], Normalizer(MEAN, STD, CPU),
             PrecisionConfig(), mode="multi_scale", scales=[24, 60])
    # each size once as it is and once mirrored; the two 30x40 images share a forward pass
    assert sorted(recorder.seen) == sorted([(2, 24, 32)] * 2 + [(1, 32, 24)] * 2 + [(2, 60, 80)] * 2
                                           + [(1, 80, 60)] * 2)


def test_multi_scale_defaults_to_the_papers_scales():
    recorder = ShapeRecorder()
    evaluate(recorder, [(images_of([(3, 4)]), torch.zeros(1, dtype=torch.int64))], Normalizer(MEAN, STD, CPU),
             PrecisionConfig(), mode="multi_scale")
    assert sorted({h for _, h, _ in recorder.seen}) == [224, 256, 384, 480, 640] == list(PAPER_SCALES)


def test_ten_crop_boxes_are_the_corners_and_the_center():
    assert ten_crop_boxes(256, 256, 224) == [(0, 0, 224, 224), (32, 0, 256, 224), (0, 32, 224, 256),
                                             (32, 32, 256, 256), (16, 16, 240, 240)]
    # odd margins: torchvision's center_crop rounding (round half to even: 2.5 -> 2, 1.0 -> 1)
    assert ten_crop_boxes(6, 9, 4) == [(0, 0, 4, 4), (5, 0, 9, 4), (0, 2, 4, 6), (5, 2, 9, 6), (2, 1, 6, 5)]
    with pytest.raises(ValueError, match="10-crop of 224 px needs images at least that large, got 200x300"):
        ten_crop_boxes(200, 300, 224)


def test_ten_crops_are_the_boxes_then_their_mirrors():
    x = torch.arange(2 * 3 * 6 * 9, dtype=torch.float32).view(2, 3, 6, 9)
    crops = ten_crops(x, 4)
    boxes = ten_crop_boxes(6, 9, 4)
    for i, (left, top, right, bottom) in enumerate(boxes):
        assert torch.equal(crops[i], x[..., top:bottom, left:right])
        assert torch.equal(crops[i + 5], x[..., top:bottom, left:right].flip(-1))


def test_shorter_side_size_follows_torchvisions_resize():
    assert shorter_side_size(375, 500, 224) == (224, 298)  # 298.67 truncated, as torchvision's Resize(224)
    assert shorter_side_size(500, 375, 224) == (298, 224)
    assert shorter_side_size(7, 7, 640) == (640, 640)
    resize = torchvision_resize()
    for h, w, s in [(375, 500, 224), (333, 500, 256), (500, 281, 384), (31, 47, 480)]:
        assert tuple(resize(torch.zeros(1, h, w), [s], antialias=True).shape[-2:]) == shorter_side_size(h, w, s)


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown eval mode 'five_crop'; known: center, ten_crop, multi_scale"):
        run("five_crop", torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64))


def test_cli_constants_match_their_owners():
    from rtrain.commands import arguments
    from rtrain.models.export import EXPORT_FORMATS

    assert arguments.EVAL_MODES == EVAL_MODES
    assert arguments.PAPER_SCALES == PAPER_SCALES
    assert arguments.EXPORT_FORMATS == EXPORT_FORMATS


def test_multi_scale_defaults_to_the_papers_scales_in_proportion_to_the_crop():
    assert scales_for(224) == list(PAPER_SCALES)
    assert scales_for(32) == [32, 36, 54, 68, 91]  # a CIFAR model: not 224..640 px views of a 32-px image
    recorder = ShapeRecorder()
    evaluate(recorder, [(images_of([(32, 32)]), torch.zeros(1, dtype=torch.int64))], Normalizer(MEAN, STD, CPU),
             PrecisionConfig(), mode="multi_scale", crop=32)
    assert sorted({h for _, h, _ in recorder.seen}) == [32, 36, 54, 68, 91]


@pytest.mark.parametrize("crop, eval_resize, transform, side", [
    (224, 256, "resize_center", 256),  # the paper's: the recipe's square
    (32, 36, "cifar", 36),  # an eval_resize that fits is used as given
    (32, 64, "cifar", 64),
    (16, 18, "resize_center", 18),
])
def test_ten_crop_uses_the_recipes_square_where_it_fits(crop, eval_resize, transform, side):
    assert ten_crop_square(crop, eval_resize, transform) == TenCropSquare(side)


def test_ten_crop_of_a_cifar_recipe_is_sized_to_the_models_input():
    """The CIFAR eval transform takes images whole (eval_resize unused): the default 256 would make each of the
    10 views a 32-px corner of a 256-px square, 1/64 of the image. The square is 32 x 256/224 instead."""
    assert fitted_square(32) == 36 and fitted_square(224) == 256
    square = ten_crop_square(32, 256, "cifar")
    assert square.side == 36
    assert square.note == ("ten_crop: data.eval_resize=256 does not fit the model's input of 32 px (data.image_size); "
                           "the CIFAR eval transform takes images whole, so the 10 crops are cut from a 36-px square "
                           "(32 x 256/224)")
    assert ten_crop_square(32, 16, "cifar").side == 36


def test_ten_crop_of_a_resize_center_recipe_keeps_its_square_with_a_warning_or_refuses_a_smaller_one():
    square = ten_crop_square(32, 256, "resize_center")  # its center view is cut from the same square
    assert square.side == 256 and "each crop sees 1.6% of the 256-px square" in square.note
    assert "a 32-px model fits a square of 36 (32 x 256/224) up to 64" in square.note
    with pytest.raises(ValueError, match=r"^ten_crop: data.eval_resize=24 does not fit the model's input of 32 px "
                                         r"\(data.image_size\): it is smaller than the crop; a 32-px model fits a "
                                         r"square of 36"):
        ten_crop_square(32, 24, "resize_center")


def test_scales_far_from_the_models_input_are_named():
    assert scales_note(224, PAPER_SCALES) is None and scales_note(32, [32, 48]) is None
    assert scales_note(32, [8, 224, 640]) == (
        "multi_scale: scales 8, 224, 640 are far from the model's input of 32 px (data.image_size); the paper's scales "
        "for a 32-px model are 32, 36, 54, 68, 91")


def _training_evaluator(tmp_path, monkeypatch, **eval_section):
    from test_loader_fixtures import write_split

    import rtrain.engine.evaluate as evaluate_module
    from rtrain.config import recipe_from_dict
    from rtrain.engine.evaluate import evaluator_from_config

    write_split(tmp_path / "shards", "val", [5], num_classes=4)
    recipe = recipe_from_dict({
        "model": {"name": "cifar_resnet20", "num_classes": 4},
        "data": {"source": str(tmp_path / "shards"), "image_size": 16, "eval_resize": 256, "eval_transform": "cifar",
                 "augment": "cifar", "num_workers": 0, "pin_memory": False},
        "train": {"global_batch": 4}, "eval": eval_section, "tracking": {"enabled": False}})
    squares: list[tuple[int, int]] = []
    real = evaluate_module.ten_crops
    monkeypatch.setattr(evaluate_module, "ten_crops",
                        lambda x, crop: squares.append(tuple(x.shape[-2:])) or real(x, crop))
    return evaluator_from_config(recipe, rank=0, world_size=1, normalizer=Normalizer(MEAN, STD, CPU)), squares


def test_training_time_ten_crop_of_a_cifar_recipe_is_sized_to_the_models_input(tmp_path, monkeypatch, caplog):
    with caplog.at_level("WARNING", logger="rtrain.engine"):
        run, squares = _training_evaluator(tmp_path, monkeypatch, ten_crop=True)
    recorder = ShapeRecorder()
    assert run(recorder)["samples"] == 5
    assert set(squares) == {(18, 18)} and {(h, w) for _, h, w in recorder.seen} == {(16, 16)}
    assert [r.getMessage() for r in caplog.records] == [
        "ten_crop: data.eval_resize=256 does not fit the model's input of 16 px (data.image_size); the CIFAR eval "
        "transform takes images whole, so the 10 crops are cut from a 18-px square (16 x 256/224)"]


def test_training_time_eval_scales_warn_that_they_score_a_square_not_the_whole_image(tmp_path, monkeypatch, caplog):
    with caplog.at_level("WARNING", logger="rtrain.engine"):
        run, _ = _training_evaluator(tmp_path, monkeypatch, scales=[16, 24])
    assert run(ShapeRecorder())["samples"] == 5
    assert [r.getMessage() for r in caplog.records] == [
        "eval.scales=[16, 24]: training-time evaluation scores each image squeezed to a square of "
        "data.eval_resize=256 px at each scale, not the whole image (aspect kept); `rtrain eval RUN --mode "
        "multi_scale` scores whole images"]
