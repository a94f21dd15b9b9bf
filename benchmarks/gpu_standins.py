"""Import stand-ins for the upstream reference code in the GPU suite (written out by gpu_prepare.py).

The upstream repositories import packages at module level that their inference paths never call
(detectron2, fvcore, kornia, nltk, pycocotools, panopticapi, omegaconf, mpi4py, hydra, pydicom,
SimpleITK), and the GPU machine has none of them installed. These are the same stand-ins the oracle
scripts in Testing/oracles/ document (see Testing/fixtures/README.md): the few pieces that ARE called
are small real implementations (detectron2's ``Conv2d`` with ``norm``/``activation``, ``get_norm``,
``ShapeSpec``, ``ImageList.from_tensors``; fvcore's two weight initialisers); every other imported name
is a placeholder that raises a clear error if the benchmark ever calls it.

Two folders:

* ``always``: packages missing on the GPU machine, put ahead of everything for the upstream parts
  (mpi4py is there, but importing the real one starts MPI, which the upstream path does not use).
* ``fallback/timm``, ``fallback/torchvision``: the GPU machine has the real ones and they are used there; a
  part that needs one appends its folder to ``sys.path`` after site-packages, so it only answers where the real
  package is missing (the CPU dry run: PyPI's torchvision wheels need CUDA torch). Only the upstream code that
  imports them gets them (transformers would take a torchvision stand-in for the real one).

Nothing here is upstream code.
"""

from __future__ import annotations

from pathlib import Path

_PLACEHOLDER = '''"""Placeholders for names upstream code imports but the benchmark never calls."""


class _Placeholder:
    """Attribute access and calls give more placeholders (upstream instantiates some of these at import time);
    using a value (truth, iteration, indexing, arithmetic) raises, naming it."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(self._name + "." + attr)

    def __call__(self, *args, **kwargs):
        return _Placeholder(self._name + "()")

    def _used(self, *args, **kwargs):
        raise RuntimeError(f"stand-in: {self._name} was used; the GPU suite's stand-ins do not implement it "
                           "(benchmarks/gpu_standins.py)")

    __bool__ = __iter__ = __len__ = __getitem__ = __setitem__ = __contains__ = _used
    __add__ = __radd__ = __sub__ = __mul__ = __rmul__ = __truediv__ = __matmul__ = __lt__ = __gt__ = _used

    def __repr__(self):
        return f"<stand-in {self._name}>"


def placeholder(name):
    return _Placeholder(name)


def module_getattr(module_name):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(module_name + "." + name)

    return __getattr__


class Registry:
    """detectron2/fvcore Registry: register() is an identity decorator."""

    def __init__(self, name=""):
        self._obj = {}

    def register(self, obj=None):
        if obj is None:
            def deco(o):
                self._obj[o.__name__] = o
                return o

            return deco
        self._obj[obj.__name__] = obj
        return obj

    def get(self, name):
        return self._obj[name]
'''

_ANY = '''"""Stand-in: every name is a placeholder (benchmarks/gpu_standins.py)."""
from _textseg_standin import module_getattr

__getattr__ = module_getattr(__name__)
'''

_D2_LAYERS = '''"""detectron2.layers stand-in: Conv2d (norm, activation), get_norm, ShapeSpec; the rest placeholders."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from _textseg_standin import module_getattr


class Conv2d(nn.Conv2d):
    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def get_norm(norm, out_channels):
    if norm is None or norm == "":
        return None
    if not isinstance(norm, str):
        return norm(out_channels)
    norms = {"BN": nn.BatchNorm2d, "GN": lambda c: nn.GroupNorm(32, c), "LN": lambda c: nn.GroupNorm(1, c)}
    return norms[norm](out_channels)


@dataclass
class ShapeSpec:
    channels: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    stride: Optional[int] = None


def cat(tensors, dim=0):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def shapes_to_tensor(x, device=None):
    return torch.as_tensor(x, device=device)


class DeformConv(nn.Module):
    pass


__getattr__ = module_getattr(__name__)
'''

_D2_MODELING = '''"""detectron2.modeling stand-in: Backbone, ShapeSpec, registries (identity decorators)."""
from torch import nn

from _textseg_standin import Registry, module_getattr
from detectron2.layers import ShapeSpec  # noqa: F401


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()

    @property
    def size_divisibility(self):
        return 0

    def output_shape(self):
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}


BACKBONE_REGISTRY = Registry("BACKBONE")
SEM_SEG_HEADS_REGISTRY = Registry("SEM_SEG_HEADS")
META_ARCH_REGISTRY = Registry("META_ARCH")
__getattr__ = module_getattr(__name__)
'''

_D2_STRUCTURES = '''\
"""detectron2.structures stand-in: ImageList.from_tensors (pad to a common size); the rest placeholders."""
import math

import torch
import torch.nn.functional as F

from _textseg_standin import module_getattr


class ImageList:
    def __init__(self, tensor, image_sizes):
        self.tensor, self.image_sizes = tensor, image_sizes

    def __len__(self):
        return len(self.image_sizes)

    def to(self, *args, **kwargs):
        return ImageList(self.tensor.to(*args, **kwargs), self.image_sizes)

    @property
    def device(self):
        return self.tensor.device

    @staticmethod
    def from_tensors(tensors, size_divisibility=0, pad_value=0.0, padding_constraints=None):
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        if size_divisibility > 1:
            h, w = (int(math.ceil(v / size_divisibility) * size_divisibility) for v in (h, w))
        batched = torch.stack([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=pad_value) for t in tensors])
        return ImageList(batched.contiguous(), sizes)


__getattr__ = module_getattr(__name__)
'''

_D2_MEMORY = '''"""detectron2.utils.memory stand-in."""


def retry_if_cuda_oom(func):
    return func
'''

_D2_COMM = '''"""detectron2.utils.comm stand-in: one process."""
from _textseg_standin import module_getattr


def get_world_size():
    return 1


def get_rank():
    return 0


def is_main_process():
    return True


__getattr__ = module_getattr(__name__)
'''

_FV_INIT = '''"""fvcore.nn.weight_init stand-in (the two Caffe2-style initialisers)."""
from torch import nn


def c2_xavier_fill(module):
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def c2_msra_fill(module):
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)
'''

_FV_CONFIG = '''"""fvcore.common.config stand-in: a CfgNode base class (a dict)."""


class CfgNode(dict):
    pass
'''

_MPI = '''"""mpi4py stand-in: one process, no MPI start-up."""


class _Comm:
    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Barrier(self):
        pass

    def bcast(self, obj, root=0):
        return obj


class MPI:
    COMM_WORLD = _Comm()
'''

_HYDRA = '''"""hydra stand-in: upstream v2's inference.py imports it; the suite builds the model by hand."""
from _textseg_standin import module_getattr

__getattr__ = module_getattr(__name__)
'''

_TIMM_LAYERS = '''"""timm.models.layers stand-in (only where timm is not installed)."""
import collections.abc
from itertools import repeat

from torch import nn

from _textseg_standin import module_getattr


def to_2tuple(x):
    return tuple(x) if isinstance(x, collections.abc.Iterable) else tuple(repeat(x, 2))


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return nn.init.trunc_normal_(tensor, mean, std, a, b)


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):  # inference only
        return x


__getattr__ = module_getattr(__name__)
'''

_TIMM_LOSS = '''"""timm.loss stand-in (only where timm is not installed): upstream builds a loss at import."""
from torch import nn

from _textseg_standin import module_getattr


class SoftTargetCrossEntropy(nn.Module):
    def forward(self, x, target):
        raise RuntimeError("stand-in: timm.loss.SoftTargetCrossEntropy is for training only")


__getattr__ = module_getattr(__name__)
'''

_TV_BOXES = '''"""torchvision.ops.boxes stand-in (only where torchvision is not installed)."""
from _textseg_standin import module_getattr


def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


__getattr__ = module_getattr(__name__)
'''

_PKG = '"""Stand-in package (benchmarks/gpu_standins.py)."""\n'

ALWAYS: dict[str, str] = {
    "_textseg_standin.py": _PLACEHOLDER,
    "detectron2/__init__.py": _PKG,
    "detectron2/layers/__init__.py": _D2_LAYERS,
    "detectron2/modeling/__init__.py": _D2_MODELING,
    "detectron2/structures/__init__.py": _D2_STRUCTURES,
    "detectron2/data/__init__.py": _ANY,
    "detectron2/utils/__init__.py": _PKG,
    "detectron2/utils/file_io.py": _ANY,
    "detectron2/utils/memory.py": _D2_MEMORY,
    "detectron2/utils/comm.py": _D2_COMM,
    "detectron2/utils/colormap.py": _ANY,
    "fvcore/__init__.py": _PKG,
    "fvcore/nn/__init__.py": "from . import weight_init  # noqa: F401\n",
    "fvcore/nn/weight_init.py": _FV_INIT,
    "fvcore/common/__init__.py": _PKG,
    "fvcore/common/config.py": _FV_CONFIG,
    "kornia/__init__.py": _ANY,
    "kornia/contrib.py": _ANY,
    "nltk/__init__.py": _ANY,
    "nltk/stem/__init__.py": _ANY,
    "nltk/stem/lancaster.py": _ANY,
    "pycocotools/__init__.py": _PKG,
    "pycocotools/mask.py": _ANY,
    "panopticapi/__init__.py": _PKG,
    "panopticapi/utils.py": _ANY,
    "omegaconf/__init__.py": _ANY,
    "mpi4py/__init__.py": _MPI,
    "hydra/__init__.py": _HYDRA,
    "hydra/core/__init__.py": _PKG,
    "hydra/core/global_hydra.py": _ANY,
    "hydra/utils.py": _ANY,
    "pydicom/__init__.py": _ANY,
    "SimpleITK/__init__.py": _ANY,
}

FALLBACK: dict[str, str] = {  # fallback/<package>/...: each package its own folder (added only where needed)
    "timm/__init__.py": _PKG,
    "timm/models/__init__.py": _PKG,
    "timm/models/layers/__init__.py": _TIMM_LAYERS,
    "timm/layers/__init__.py": _TIMM_LAYERS,
    "timm/loss/__init__.py": _TIMM_LOSS,
    "torchvision/__init__.py": _ANY,
    "torchvision/transforms/__init__.py": _ANY,
    "torchvision/ops/__init__.py": _ANY,
    "torchvision/ops/boxes.py": _TV_BOXES,
}


def write(root: Path) -> dict[str, int]:
    """Write both folders under ``root``; returns {relative path: bytes}."""
    sizes = {}
    for folder, files in (("always", ALWAYS), ("fallback", FALLBACK)):
        for rel, text in files.items():
            path = root / folder / rel if folder == "always" else root / folder / rel.split("/")[0] / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            sizes[f"{folder}/{rel}"] = len(text.encode())
    return sizes
