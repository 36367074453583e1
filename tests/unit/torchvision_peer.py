"""torchvision, the real peer of the export and evaluation tests, imported beside a CPU-only torch.

PyPI's torchvision 0.28.0 wheel (the pin beside torch 2.13.0) is a CUDA build: beside the CPU torch its C++
ops library cannot load (it needs libc10_cuda.so), and `import torchvision` then fails in
torchvision/_meta_registrations.py with "operator torchvision::nms does not exist", because that module
registers fake kernels for nms and qnms without checking that the ops loaded. Declaring those two operator
schemas (the ones torchvision's C++ library declares) lets the pure-Python package import. Nothing here calls
the ops: the ResNets, resnet_fpn_backbone and the tensor transforms used by the tests are torchvision's own
Python code. With a torchvision whose ops load, nothing is declared.
"""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
import torch

_NMS_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES: list[torch.library.Library] = []  # declarations live as long as their Library object


def _forget_partial_import() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    pytest.importorskip("torchvision", reason="torchvision (the `test` extra) is not installed")
    return sys.modules["torchvision"]


def _import_with_declared_ops() -> None:
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: import_torchvision skips
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
    _forget_partial_import()
    if not _LIBRARIES:
        library = torch.library.Library("torchvision", "DEF")
        for schema in _NMS_SCHEMAS:
            library.define(schema)
        _LIBRARIES.append(library)
    import torchvision  # noqa: F401,F811


_import_with_declared_ops()
