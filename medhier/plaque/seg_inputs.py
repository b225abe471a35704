"""What the segmentation model sees of a visit, and how its answer goes back onto the visit.

    reference grid (Z, Y, X), spacing (dz, dy, dx) mm: the reference sequence's volume
      each sequence of ``seg.sequences`` ──resampled onto the reference grid through its rigid
          transform (linear; the reference itself as it is)──▶ (Z, Y, X)
      ──scaled so that its own ``seg.percentiles`` (default 1st and 99th, over its whole volume)
          become 0 and 1──▶
      ──in-plane onto the model grid (:class:`ModelGrid`: ``seg.spacing_mm`` pixels,
          ``seg.image_size`` square, centred on the reference grid's centre; linear)──▶ (Z, C, S, S)
      ──2.5-D (``seg.context`` = c > 0): slices k-c .. k+c stacked as channels, sequence-major
          within each slice, edge slices repeated──▶ float32 (Z, C (2c + 1), S, S)

The model answers per slice with logits (Z, labels, S, S) on the model grid;
:meth:`ModelGrid.reference_points` says where each reference pixel falls on it, so the logits
are interpolated back onto the reference grid (bilinear) before the argmax: the label map lies
on the reference series' own grid, as a DICOM SEG on that series needs. Where the model grid
does not reach (a reference grid larger than ``image_size`` x ``spacing_mm``) the label is
background. When the reference's pixels already are ``spacing_mm`` and it is ``image_size``
square, both mappings are the identity and nothing is interpolated.

Labels for training go the same way as images, by nearest neighbour (order 0).

A sequence of ``seg.sequences`` the visit lacks (no series formed a volume, or its registration
failed or was implausible) rejects the visit: ``missing_sequence``. No channel is filled in: a
model fed a blank channel would segment without saying it is guessing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from medhier.config import PlaqueConfig, SegConfig
from medhier.io.volume import SeriesVolume
from medhier.plaque.register import RegistrationError, resample
from medhier.plaque.report import VisitRejected

__all__ = ["ModelGrid", "check_sequences", "input_channels", "model_inputs", "normalise", "stack_context"]


def input_channels(cfg: SegConfig) -> int:
    """Channels of the model's input: one per sequence, times 2 ``context`` + 1 slices."""
    return len(cfg.sequences) * (2 * cfg.context + 1)


def check_sequences(seg: SegConfig, plaque: PlaqueConfig) -> None:
    """Every ``seg.sequences`` entry must be a ``plaque.sequences`` name, the reference among them
    (its grid is the visit's). Raises ValueError naming the setting."""
    unknown = [s for s in seg.sequences if s not in plaque.sequences]
    if unknown:
        raise ValueError(f"seg.sequences names {unknown}, which are not plaque.sequences {list(plaque.sequences)}")
    if plaque.reference not in seg.sequences:
        raise ValueError(f"seg.sequences {seg.sequences} must include the reference sequence plaque.reference ({plaque.reference!r})")


@dataclass(frozen=True)
class ModelGrid:
    """The model's in-plane grid over a reference grid: ``size`` x ``size`` pixels of
    ``spacing_mm``, centred on the reference's centre. ``shape``: the reference (Y, X);
    ``pixel_mm``: its (dy, dx)."""

    shape: tuple[int, int]
    pixel_mm: tuple[float, float]
    spacing_mm: float
    size: int

    @classmethod
    def over(cls, reference: SeriesVolume, cfg: SegConfig) -> ModelGrid:
        _, dy, dx = reference.spacing
        return cls(tuple(int(n) for n in reference.shape[1:]), (float(dy), float(dx)), float(cfg.spacing_mm), int(cfg.image_size))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelGrid:
        data = json.loads(text)
        return cls(tuple(data["shape"]), tuple(data["pixel_mm"]), float(data["spacing_mm"]), int(data["size"]))

    @property
    def identity(self) -> bool:
        """The reference grid is the model grid: nothing to interpolate."""
        return self.shape == (self.size, self.size) and np.allclose(self.pixel_mm, self.spacing_mm, rtol=1e-6)

    def _to_reference(self) -> tuple[np.ndarray, np.ndarray]:
        """Model pixel index -> reference pixel index, per axis: (scale, offset)."""
        scale = np.array([self.spacing_mm / self.pixel_mm[0], self.spacing_mm / self.pixel_mm[1]])
        centre = (np.array(self.shape, float) - 1) / 2
        return scale, centre - scale * (self.size - 1) / 2

    def to_model(self, array: np.ndarray, order: int) -> np.ndarray:
        """(Z, Y, X) on the reference grid -> (Z, S, S) on the model grid; ``order`` 1 for
        images (float32 out), 0 for label maps (dtype kept). Outside the reference: 0."""
        if self.identity:
            return array.astype(np.float32) if order else array
        scale, offset = self._to_reference()
        source = array.astype(np.float32) if order else array
        return ndimage.affine_transform(source, [1.0, scale[0], scale[1]], offset=[0.0, offset[0], offset[1]],
                                        output_shape=(array.shape[0], self.size, self.size), order=order, mode="constant", cval=0)

    def reference_points(self) -> np.ndarray:
        """Where each reference pixel's centre falls on the model grid, in grid_sample's
        normalised coordinates (align_corners=True: -1 and 1 are the first and last pixel
        centres) -> float32 (Y, X, 2) as (x, y)."""
        scale, offset = self._to_reference()
        rows = (np.arange(self.shape[0]) - offset[0]) / scale[0]
        cols = (np.arange(self.shape[1]) - offset[1]) / scale[1]
        norm = lambda i: 2 * i / max(self.size - 1, 1) - 1  # noqa: E731
        yy, xx = np.meshgrid(norm(rows), norm(cols), indexing="ij")
        return np.stack([xx, yy], axis=-1).astype(np.float32)


def normalise(array: np.ndarray, percentiles: tuple[float, float] | list[float], by: np.ndarray | None = None) -> np.ndarray:
    """``array`` scaled so that the ``percentiles`` (low, high) of ``by`` (default: ``array``)
    become 0 and 1 (float32). MR intensities have no unit: scanners, coils and gains differ
    from visit to visit."""
    low, high = np.percentile(array if by is None else by, list(percentiles))
    return ((array - low) / max(float(high - low), 1e-6)).astype(np.float32)


def stack_context(channels: np.ndarray, context: int) -> np.ndarray:
    """(Z, C, S, S) -> (Z, C (2 context + 1), S, S): each slice with its ``context`` neighbours
    on each side (k - c first), edge slices repeated."""
    if not context:
        return channels
    z = channels.shape[0]
    picks = [np.clip(np.arange(z) + d, 0, z - 1) for d in range(-context, context + 1)]
    return np.concatenate([channels[p] for p in picks], axis=1)


def model_inputs(reference: SeriesVolume, sequences: Mapping[str, tuple[SeriesVolume, Any]], cfg: SegConfig,
                 reference_name: str) -> np.ndarray:
    """A visit's input to the model (module docstring) -> float32 (Z, C, S, S). ``sequences``:
    sequence -> (volume, its RigidTransform onto the reference, None when it has none), as
    :class:`medhier.plaque.segmentations.SegmentationInput` carries them; ``reference_name``:
    the reference's sequence. Raises :class:`VisitRejected` ``missing_sequence``."""
    grid = ModelGrid.over(reference, cfg)
    channels = []
    for name in cfg.sequences:
        if name == reference_name:
            source = volume = reference.array
        else:
            found = sequences.get(name)
            if found is None or found[1] is None:
                why = "no series formed a volume" if found is None else "its registration onto the reference failed"
                raise VisitRejected("missing_sequence", f"the segmentation model needs {name} (seg.sequences): {why}")
            moving, transform = found
            try:
                volume = resample(moving.volume, transform, reference.volume, interpolation="linear").array
            except RegistrationError as exc:
                raise VisitRejected("missing_sequence", f"{name} cannot be resampled onto the reference: {exc.message}") from None
            source = moving.array  # its own intensities, not the zeros outside its field of view
        channels.append(grid.to_model(normalise(volume, cfg.percentiles, by=source), order=1))
    return stack_context(np.stack(channels, axis=1), cfg.context)
