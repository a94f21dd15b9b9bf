"""BiomedParse v2 (2.5D, slice-wise): spec, preprocessing, network, loader, recognition and adapter."""
