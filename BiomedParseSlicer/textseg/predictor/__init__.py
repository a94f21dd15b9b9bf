"""The predictor: encode an image once, decode many prompts (cf. segment-anything's SamPredictor).

* ``contract.py``: ``PredictorProtocol``, the contract the local ``Predictor`` and the HTTP
  ``textseg.remote.client.RemotePredictor`` both implement (shapes and frames), and ``check_prompts``.
* ``local.py``: ``Predictor`` (the contract on this machine) and ``load_adapter``.
* ``slices.py``: slice-wise models: batches of canonical slices and their cache.
* ``recognition.py``: "segment everything" over the slice batches.
* ``results.py``: ``PromptResult`` and how one is made (input grid, threshold, existence, provenance).
* ``devices.py``: device choice and the GPU out-of-memory fallback.
"""

from .contract import PredictorProtocol, PromptLike, check_prompts
from .devices import is_out_of_memory, select_device
from .local import Predictor, load_adapter
from .results import PromptResult

__all__ = ["Predictor", "PredictorProtocol", "PromptLike", "PromptResult", "check_prompts", "is_out_of_memory",
           "load_adapter", "select_device"]
