"""Longitudinal plaque change (seed 003): MR series as volumes, visits, registered sequences,
segmentation of vessel, plaque and components, measurements in millimetres, change rates per
year, and their prediction from one visit and the patient's record. It hands its pieces to the
platform (``io``, ``data``, ``train``, ``infer``) as the classifier does."""
