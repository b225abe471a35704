"""Bytes in and out, with neither Ray nor torch: storage (local folders, S3), DICOM decoding (the
one module that parses DICOM headers), images, and DICOM SR writing. Tested on any file in
milliseconds."""
