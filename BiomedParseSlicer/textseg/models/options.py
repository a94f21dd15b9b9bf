"""The model adapters' settings, typed and documented in one place.

Adapter options are keyword arguments of ``Predictor(model, **options)`` (and of an adapter's constructor;
the server's ``Settings.adapter_options`` per model). ``AdapterOptions.from_mapping`` reads the settings
below out of them, checked; whatever else an options mapping holds are objects tests inject in place of
weight files (``config``, ``network``, ``text_tower``, ``tokenizer_dir``, ``patch``), read by the adapter
that uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from ..errors import UsageError

# Names of earlier releases (Python API only: no command, server setting or panel ever set them).
RENAMED = {"window_cache_bytes": "feature_cache_bytes", "cache_bytes": "feature_cache_bytes"}


@dataclass(frozen=True)
class AdapterOptions:
    """Every setting of every adapter, with its unit and default.

    Memory and speed (all models):

    * ``feature_cache_bytes`` (bytes, default None = 2 GiB, on CUDA at most half the free GPU memory; 0 = no
      cache): the budget of the one feature cache (``textseg.models.feature_cache.FeatureCache``, least recently
      used dropped first) an image keeps for its next prompts: the predictor's encoded slice batches
      (BiomedParse v1/v2 and other slice-wise models), SegVol's window embeddings (~6 MB a window at full size),
      SAT's window features (the features of a batch of patches; ~2 GB a patch at full size).
      The number of slices or patches encoded at once is the predictor's ``batch_size`` (default 4 for
      slice-wise models, 1 for volume models; halved after a GPU out-of-memory error).

    SAT (``sat-nano``, ``sat-pro``):

    * ``memory_budget`` (bytes, default 2 GiB): the float32 probability maps of the prompts decoded in one pass
      over the patches stay below it: at most ``memory_budget // (4 * SAT-grid voxels)`` prompts a pass (1..64).
    * ``max_queries`` (prompts, default 256): prompts per text-tower and decoder call.
    * ``autocast`` (default True: float16 on CUDA as upstream, float32 on a CPU; False: float32; "bfloat16";
      "float16" on CUDA only): the network's precision.
    * ``compat_upstream`` (default False): also upstream's exact sample positions (slower; see docs/sat.md).

    SegVol (``segvol``):

    * ``zoom_in`` (default True): the zoom-in pass over the region of interest (False: zoom-out only, faster).
    * ``seed`` (default 0; the predictor's ``seed`` wins): the random choice of point prompts.

    BiomedParse v2 (``biomedparse-v2``):

    * ``compat_upstream`` (default False): upstream's sampling and output path, all prompts in one call;
      ``deterministic`` (default False): full attention, no sampling; ``resize_path`` (default "uint8", or
      "float"): the path the slice is resized on (docs/biomedparse-v2.md).

    BiomedParse v1 (``biomedparse-v1``):

    * ``concat_prompts`` (default False): upstream compatibility, the prompts of a call share one grounding
      token sequence; ``image_type`` (default None: from the modality and site): force an upstream image
      type for the existence test and recognition.

    Test model (``synthetic-2d``, ``synthetic-3d``):

    * ``delay`` (seconds, default 0): per step, for cancel tests; ``fits`` (batch size, default None): a larger
      batch on a CUDA device raises an out-of-memory error.
    """

    feature_cache_bytes: Optional[int] = None
    memory_budget: int = 2 << 30
    max_queries: int = 256
    autocast: Union[bool, str, None] = True
    compat_upstream: bool = False
    zoom_in: bool = True
    seed: int = 0
    deterministic: bool = False
    resize_path: str = "uint8"
    concat_prompts: bool = False
    image_type: Optional[str] = None
    delay: float = 0.0
    fits: Optional[int] = None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> AdapterOptions:
        """The settings of ``options`` (other keys are left to the adapters); one clear UsageError per bad one."""
        for old, new in RENAMED.items():
            if old in options:
                raise UsageError(f"Adapter option '{old}' is now '{new}' (one budget for every feature cache); "
                                 f"pass {new}=... instead.")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in options.items() if k in names}
        for key in ("feature_cache_bytes", "memory_budget", "max_queries"):
            value = values.get(key)
            if value is None:
                continue
            least = 1 if key == "max_queries" else 0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least or value != int(value):
                raise UsageError(f"Adapter option {key}={value!r}: give a whole number >= {least} "
                                 f"({'prompts' if least else 'bytes'}).")
            values[key] = int(value)
        return cls(**values)
