"""BiomedParse v1 (2D, slice-wise): spec, preprocessing, network, existence test and adapter."""
