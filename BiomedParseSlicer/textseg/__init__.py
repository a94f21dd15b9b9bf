"""textseg: the Slicer-free engine of BiomedParseSlicer.

Text-prompted segmentation of medical images: volumes with exact geometry, modality presets,
a predictor that encodes an image once and decodes many prompts, model adapters, weights
manager, segment files, statistics, an HTTP server/client and a CLI. Imports nothing from Slicer/Qt;
torch is imported only where models run.
"""

__version__ = "0.1.0"
