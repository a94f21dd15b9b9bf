"""BiomedParse family. Torch-free: specs only (networks live in the submodules)."""

from .v1_spec import SPECS as _V1_SPECS

SPECS = list(_V1_SPECS)
