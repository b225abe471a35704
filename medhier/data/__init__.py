"""The only package that builds Ray datasets: archive listing into manifests, labels and patient
splits, the DICOM ingest, and the decoded cache that epochs and trials read."""
