"""Files: images read (checked, isolated), segments written (.seg.nrrd, labelmap, DICOM SEG), training sets."""
