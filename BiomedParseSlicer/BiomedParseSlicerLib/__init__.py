"""Helpers of the BiomedParseSlicer module that need no Qt: MRML glue (``mrml``), statistics
(``stats``), background runs (``runner``), environment/setup checks (``environment``) and the
checks shared by the pytest suite and the module's self-test (``checks``).

Everything here works both inside 3D Slicer and with the PyPI ``slicer-core`` wheel (no Qt)."""
