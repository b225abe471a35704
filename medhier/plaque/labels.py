"""The plaque task's label set: every segmentation (a DICOM SEG, a NIfTI mask, the model's output)
is mapped to this one exclusive label map, one integer per voxel.

=====  =================  ==============================================================
value  name               what the voxel is
=====  =================  ==============================================================
0      background         outside the vessel
1      lumen              the vessel's lumen (flowing blood)
2      wall               vessel wall tissue that is none of the components below
                          (normal wall, fibrous plaque tissue)
3      lipid_core         lipid-rich necrotic core (LRNC)
4      haemorrhage        intraplaque haemorrhage (IPH)
5      calcification      calcification
6      fibrous_cap        the fibrous tissue between the lumen and a lipid core
=====  =================  ==============================================================

The outer vessel wall encloses every non-zero voxel: ``labels > 0`` is the region inside the
outer wall contour, ``labels >= WALL`` the vessel wall with its plaque components. Annotation
tools that export overlapping regions (an outer-wall region that contains the lumen and the
components) are flattened in the order wall < lumen < components, so a component always wins.
"""

from __future__ import annotations

__all__ = ["BACKGROUND", "CALCIFICATION", "CAP", "COMPONENTS", "HAEMORRHAGE", "LABELS", "LIPID", "LUMEN", "NAMES", "WALL"]

BACKGROUND, LUMEN, WALL, LIPID, HAEMORRHAGE, CALCIFICATION, CAP = range(7)
NAMES = ("background", "lumen", "wall", "lipid_core", "haemorrhage", "calcification", "fibrous_cap")
LABELS = {name: value for value, name in enumerate(NAMES)}
# The plaque components, each measured as its own volume.
COMPONENTS = (LIPID, HAEMORRHAGE, CALCIFICATION, CAP)
