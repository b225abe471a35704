"""What the segmentation model sees of a visit and how its answer goes back onto the visit's grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medhier.config import load_config
from medhier.plaque import labels as L
from medhier.plaque.report import VisitRejected
from medhier.plaque.seg_inputs import ModelGrid, check_sequences, input_channels, model_inputs, normalise, stack_context
from medhier.plaque.seg_presets import eval_preset, train_preset
from medhier.plaque.segmentations import ArchiveSegmentations
from medhier.plaque.study import VisitSettings, assemble_visit
from medhier.plaque.visits import plan_study
from tests.plaque.phantoms import study_of


@pytest.mark.parametrize("sequences, context, channels", [(["T1w"], 0, 1), (["T1w", "T2w", "TOF", "CE-T1w"], 0, 4),
                                                          (["T1w", "T2w"], 1, 6), (["T1w", "T2w", "TOF", "CE-T1w"], 2, 20)])
def test_input_channels_are_sequences_times_slices(sequences, context, channels):
    seg = load_config(None, [f"seg.sequences=[{','.join(sequences)}]", f"seg.context={context}"]).seg
    assert input_channels(seg) == channels


def test_context_stacks_neighbours_sequence_major_and_repeats_the_edges():
    z = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 2, 1, 1), np.float32)  # slice k holds k
    z[:, 1] += 10  # second sequence: 10 + k
    out = stack_context(z, 1)
    assert out.shape == (4, 6, 1, 1)
    assert out[0, :, 0, 0].tolist() == [0, 10, 0, 10, 1, 11]  # k-1 (repeated edge), k, k+1
    assert out[3, :, 0, 0].tolist() == [2, 12, 3, 13, 3, 13]


def test_normalisation_maps_the_percentiles_to_zero_and_one():
    a = np.linspace(0, 1000, 10001, dtype=np.float32)
    n = normalise(a, [1, 99])
    assert np.percentile(n, 1) == pytest.approx(0, abs=1e-5) and np.percentile(n, 99) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("shape, pixel_mm, size, spacing", [((64, 64), (0.5, 0.5), 64, 0.5), ((80, 72), (0.4, 0.4), 64, 0.5),
                                                            ((48, 48), (0.5, 0.5), 64, 0.5)])
def test_labels_on_the_model_grid_come_back_onto_the_reference_grid(shape, pixel_mm, size, spacing):
    """A disc of lumen in a ring of wall, centred: to the model grid (nearest) and back (one-hot
    logits, bilinear, argmax) it keeps its area within a pixel's ring."""
    grid = ModelGrid(shape, pixel_mm, spacing, size)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r_mm = np.hypot((yy - (shape[0] - 1) / 2) * pixel_mm[0], (xx - (shape[1] - 1) / 2) * pixel_mm[1])
    labels = np.where(r_mm < 3, L.LUMEN, np.where(r_mm < 6, L.WALL, 0)).astype(np.uint8)[None]
    model = grid.to_model(labels, order=0)
    assert model.shape == (1, size, size)
    lumen_mm2 = (model == L.LUMEN).sum() * spacing**2
    assert lumen_mm2 == pytest.approx(np.pi * 9, rel=0.15)
    logits = F.one_hot(torch.from_numpy(model.astype(np.int64)), len(L.NAMES)).permute(0, 3, 1, 2).float()
    points = torch.from_numpy(grid.reference_points())[None]
    back = F.grid_sample(logits, points, mode="bilinear", padding_mode="zeros", align_corners=True).argmax(1).numpy()
    assert back.shape == labels.shape
    assert np.mean(back == labels) > 0.97
    assert grid.identity == (shape == (size, size) and pixel_mm == (spacing, spacing))


def test_model_inputs_of_a_phantom_visit_and_a_missing_sequence(carotid_archive):
    cfg = load_config(None, ["plaque.register=false"])
    study = study_of(carotid_archive.root, "P0001/V01")
    source = ArchiveSegmentations()
    visit = assemble_visit(study, plan_study(study.members, cfg.plaque.sequences), VisitSettings(cfg.plaque, source, source.model_id, "", ""))
    x = model_inputs(visit.reference, visit.input.sequences, cfg.seg, cfg.plaque.reference)
    assert x.shape == (10, 4, 64, 64) and x.dtype == np.float32
    for c in range(4):  # each sequence scaled by its own percentiles
        assert 0.0 <= np.percentile(x[:, c], 50) <= 1.0 and np.percentile(x[:, c], 99.5) > 0.9
    without_tof = {k: v for k, v in visit.input.sequences.items() if k != "TOF"}
    with pytest.raises(VisitRejected, match="TOF") as caught:
        model_inputs(visit.reference, without_tof, cfg.seg, cfg.plaque.reference)
    assert caught.value.reason == "missing_sequence"


def test_sequences_the_plaque_section_does_not_know_are_refused():
    cfg = load_config(None, ["seg.sequences=[T1w,PD]"])
    with pytest.raises(ValueError, match="PD"):
        check_sequences(cfg.seg, cfg.plaque)
    cfg = load_config(None, ["seg.sequences=[T2w]"])
    with pytest.raises(ValueError, match="reference"):
        check_sequences(cfg.seg, cfg.plaque)


def test_augmentation_moves_inputs_and_labels_together_and_labels_stay_labels():
    seg = load_config(None, ["seg.rotation_deg=0", "seg.scale=[1,1]", "seg.hflip=1", "seg.vflip=0",
                             "seg.intensity_scale=0", "seg.intensity_shift=0"]).seg
    x = torch.zeros(2, 4, 16, 16, dtype=torch.float16)
    y = torch.zeros(2, 16, 16, dtype=torch.uint8)
    x[:, :, 4:8, 2:5] = 1
    y[:, 4:8, 2:5] = L.LIPID
    xa, ya = train_preset(seg)(x, y, torch.Generator().manual_seed(0))
    # a left-right flip: the block now lies at columns 11..13
    assert torch.equal(ya, torch.flip(y, dims=[2]).long())
    assert torch.allclose(xa, torch.flip(x, dims=[3]).float(), atol=1e-3)
    seg = load_config(None, []).seg
    _, yr = train_preset(seg)(x, y, torch.Generator().manual_seed(1))
    assert set(torch.unique(yr).tolist()) <= {0, L.LIPID}
    xe, ye = eval_preset(seg)(x, y)
    assert torch.equal(xe, x.float()) and torch.equal(ye, y.long())
