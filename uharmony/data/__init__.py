"""Image I/O (NIfTI, NRRD, MetaImage, DICOM), preprocessing, datalists and synthesis."""
