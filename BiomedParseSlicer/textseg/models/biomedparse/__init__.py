"""BiomedParse family. Torch-free: specs only (networks live in the submodules)."""

from .v1.spec import SPECS as _V1_SPECS
from .v2.spec import SPECS as _V2_SPECS

SPECS = list(_V1_SPECS) + list(_V2_SPECS)
