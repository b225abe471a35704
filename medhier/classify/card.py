"""The model card: what a trained classifier is for, what it was trained on, how well it did,
written as ``model_card.md`` (for people) and ``model_card.json`` (the same facts, for tools)
beside every ``best/`` that ``medhier train`` and ``medhier tune`` leave.

Sections (JSON keys): ``model`` (id, epoch, medhier version, architecture, taxonomy),
``intended_use`` and ``limitations`` (fixed text plus what the data shows: the modalities,
body parts and manufacturers it has seen, synthetic phantoms), ``training_data`` (images and
patients per split, images per leaf and split, modalities, body parts, manufacturers, study
dates, leaves a split lacks), ``evaluation`` (the split, accuracy / macro sensitivity,
specificity and ROC AUC per level with 95 % patient-bootstrap intervals), ``calibration``
(temperatures, ECE and class-wise ECE before and after), ``referral`` (threshold, how it was
chosen, coverage and accuracy on validation and evaluation), ``config`` (the resolved config,
secrets redacted).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from typing import Any

from medhier import __version__
from medhier import columns as C
from medhier.classify.labels import LEAF_INDEX
from medhier.classify.taxonomy import Taxonomy
from medhier.config import Config
from medhier.data.cache import CacheInfo, cache_table
from medhier.data.splits import split_key
from medhier.io import storage
from medhier.train.checkpoint import Loaded

__all__ = ["CARD_JSON", "CARD_MD", "model_card", "write_model_card"]

CARD_MD, CARD_JSON = "model_card.md", "model_card.json"
PHANTOM_MANUFACTURER = "medhier-phantom"  # what medhier.synthetic writes: a model trained on it is a demo

INTENDED_USE = (
    "Decision support for trained readers: the model assigns one 2-D DICOM image to a main class "
    "and a subclass inside it ({classes}), with calibrated probabilities, and refers the images "
    "it is unsure of to a human reader. It is a second reader and a triage aid, not a diagnosis: "
    "every finding is confirmed by a qualified reader."
)
LIMITATIONS = (
    "Validated only on data like its training data (below): other modalities, body parts, scanners "
    "or protocols can behave differently; each scoring run's drift check (summary.json) compares "
    "its images with this profile.",
    "One image at a time: no prior studies, other slices, clinical history or report are used.",
    "Probabilities are calibrated on the validation split of this data set; they need not hold on another population.",
    "Images it refers (report column refer) have no usable answer and must be read.",
    "Classes outside the taxonomy are forced into one of its classes.",
)


def _dataset(cache: str, cfg: Config, tax: Taxonomy) -> dict[str, Any]:
    info = CacheInfo.read(cache, cfg.storage)
    rows = cache_table(cache, cfg.storage, [C.SPLIT, LEAF_INDEX, C.PATIENT_KEY, C.STUDY_INSTANCE_UID, C.PATH, C.MODALITY, C.BODY_PART,
                                            C.MANUFACTURER, C.STUDY_DATE])
    columns = {name: rows.column(name).to_pylist() for name in rows.column_names} if rows.num_rows else {}
    splits = columns.get(C.SPLIT, [])
    patients: dict[str, set] = {}
    per_leaf: dict[str, Counter] = {}
    for i, split in enumerate(splits):
        key = split_key({C.PATIENT_KEY: columns[C.PATIENT_KEY][i], C.STUDY_INSTANCE_UID: columns[C.STUDY_INSTANCE_UID][i]}, columns[C.PATH][i])
        patients.setdefault(split, set()).add(key)
        per_leaf.setdefault(split, Counter())[tax.leaf_names[int(columns[LEAF_INDEX][i])]] += 1
    dates = sorted(d for d in columns.get(C.STUDY_DATE, []) if d)
    order = [s for s in C.SPLITS if s in per_leaf]
    return {
        "archive": info.archive if info else "",
        "labels": info.labels if info else "",
        "cache": cache,
        "images": len(splits),
        "images_per_split": {s: sum(per_leaf[s].values()) for s in order},
        "patients_per_split": {s: len(patients[s]) for s in order},
        "images_per_leaf_and_split": {s: {leaf: per_leaf[s].get(leaf, 0) for leaf in tax.leaf_names} for s in order},
        "missing_leaves": (info.counts.get("missing_classes", {}) if info else {}),
        "modalities": dict(Counter(columns.get(C.MODALITY, [])).most_common()),
        "body_parts": dict(Counter(columns.get(C.BODY_PART, [])).most_common()),
        "manufacturers": dict(Counter(columns.get(C.MANUFACTURER, [])).most_common()),
        "study_dates": {"first": dates[0], "last": dates[-1]} if dates else {},
        "unlabelled_images": info.counts.get("unlabelled", 0) if info else 0,
    }


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per level: accuracy and macro sensitivity, specificity, ROC AUC as {value, interval}."""
    out = {}
    for level in ("main", "leaf"):
        m = metrics.get(level)
        if not m:
            continue
        ci = m.get("ci") or {}
        row = {"accuracy": {"value": m["accuracy"], "ci95": ci.get("accuracy")}}
        for key in ("sensitivity", "specificity", "roc_auc"):
            row[key] = {"value": m["macro"][key], "ci95": (ci.get("macro") or {}).get(key)}
        out[level] = row
    return out


def model_card(loaded: Loaded, cfg: Config, cache: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The card's facts (see the module docstring) for a finished checkpoint, its cache and
    the metrics :func:`medhier.classify.api.evaluate_checkpoint` wrote."""
    tax = Taxonomy.from_dict(**loaded.task_meta["taxonomy"])
    data = _dataset(cache, cfg, tax)
    limitations = list(LIMITATIONS)
    if PHANTOM_MANUFACTURER in data["manufacturers"]:
        limitations.insert(0, "Trained on medhier's synthetic phantoms: a demonstration, not for clinical use.")
    seen = ", ".join(f"{k or '?'}" for k in data["modalities"]) or "none"
    limitations.insert(1, f"Seen in training: modality {seen}; body part {', '.join(k or '?' for k in data['body_parts']) or 'none'}; "
                          f"manufacturer {', '.join(k or '?' for k in data['manufacturers']) or 'none'}.")
    mc = loaded.cfg.model
    return {
        "model": {"model_id": loaded.model_id, "epoch": loaded.epoch, "medhier_version": __version__, "checkpoint": loaded.uri,
                  "architecture": f"{mc.arch}, {mc.head} head, attention {mc.attention}, pretrained {mc.pretrained}, "
                                  f"input {loaded.cfg.preprocess.image_size} px",
                  "taxonomy": {m: list(s) for m, s in zip(tax.mains, tax.subs)},
                  "written": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
        "intended_use": INTENDED_USE.format(classes="; ".join(f"{m}: {', '.join(s)}" for m, s in zip(tax.mains, tax.subs))),
        "limitations": limitations,
        "training_data": data,
        "evaluation": {"split": metrics.get("split"), "images": metrics.get("n"), "metrics": _headline(metrics),
                       "bootstrap": metrics.get("bootstrap", {})},
        "calibration": metrics.get("calibration", {}),
        "referral": {**loaded.task_meta.get("referral", {}), **{f"evaluation_{k}": v for k, v in metrics.get("referral", {}).items()
                                                                 if k != "curve"}},
        "config": cfg.to_public_dict(),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown(card: dict[str, Any]) -> str:
    m, data, ev, cal, ref = card["model"], card["training_data"], card["evaluation"], card["calibration"], card["referral"]
    lines = [f"# Model card: {m['model_id']}", "", f"{m['architecture']}; epoch {m['epoch']}; medhier {m['medhier_version']}; "
             f"written {m['written']}.", "", "## Intended use", "", card["intended_use"], "", "## Limitations", ""]
    lines += [f"- {x}" for x in card["limitations"]]
    lines += ["", "## Training data", "", f"Archive `{data['archive']}`, labels `{data['labels']}`: {data['images']} labelled images "
              f"({data['unlabelled_images']} unlabelled).", ""]
    splits = list(data["images_per_leaf_and_split"])
    lines += ["| leaf | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
    leaves = next(iter(data["images_per_leaf_and_split"].values()), {})
    for leaf in leaves:
        lines.append(f"| {leaf} | " + " | ".join(str(data["images_per_leaf_and_split"][s][leaf]) for s in splits) + " |")
    lines.append("| **images (patients)** | " + " | ".join(f"{data['images_per_split'][s]} ({data['patients_per_split'][s]})" for s in splits) + " |")
    for split, names in data["missing_leaves"].items():
        lines.append(f"\n**The {split} split has no {', '.join(names)}** (too few patients).")
    dates = data["study_dates"]
    lines += ["", f"Modalities {data['modalities']}; body parts {data['body_parts']}; manufacturers {data['manufacturers']}; "
              f"study dates {dates.get('first', '?')} to {dates.get('last', '?')}.", "",
              f"## Evaluation ({ev['split']} split, {ev['images']} images)", "",
              "| level | accuracy | sensitivity | specificity | ROC AUC |", "| --- | --- | --- | --- | --- |"]
    for level, row in ev["metrics"].items():
        cells = [f"{_fmt(row[k]['value'])}" + (f" [{row[k]['ci95'][0]:.3f}, {row[k]['ci95'][1]:.3f}]" if row[k]["ci95"] else "")
                 for k in ("accuracy", "sensitivity", "specificity", "roc_auc")]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    if ev.get("bootstrap"):
        b = ev["bootstrap"]
        lines.append(f"\nSensitivity, specificity and AUC are macro averages; brackets: 95 % intervals, {b['samples']} bootstrap "
                     f"resamples of {b['patients']} patients.")
    lines += ["", "## Calibration", ""]
    if cal.get("temperatures"):
        t = cal["temperatures"]
        lines.append(f"Temperatures fitted on the validation split: main {t['main']}, sub {t['sub']}"
                     + (f"; class biases (bias-corrected temperature scaling): main {t['main_bias']}, leaves {t['sub_bias']}." if t.get("main_bias") else "."))
    else:
        lines.append("No temperatures: the probabilities are the model's own.")
    for level, errors in cal.get("ece", {}).items():
        lines.append(f"- {level}: ECE {_fmt(errors['before'])} before, {_fmt(errors['after'])} after; class-wise ECE "
                     f"{_fmt(errors['classwise_before'])} before, {_fmt(errors['classwise_after'])} after")
    lines += ["", "## Referral", ""]
    if ref:
        lines.append(f"Refer below leaf probability {_fmt(ref.get('threshold'))} (the lowest at which the validation images kept reach "
                     f"{_fmt(ref.get('target_accuracy'))} accuracy: coverage {_fmt(ref.get('coverage'))}, accuracy {_fmt(ref.get('accuracy'))})."
                     + ("" if ref.get("reached", True) else " The target was not reached: every image is referred by default."))
        if "evaluation_coverage" in ref:
            lines.append(f"On the evaluation split: {_fmt(ref['evaluation_coverage'])} of images answered, accuracy "
                         f"{_fmt(ref.get('evaluation_accuracy_kept'))} on them ({_fmt(ref.get('evaluation_accuracy_all'))} on all).")
    lines += ["", "## Configuration", "", "```json", json.dumps(card["config"], indent=1), "```", ""]
    return "\n".join(lines)


def write_model_card(output: str, loaded: Loaded, cfg: Config, cache: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write ``model_card.md`` and ``model_card.json`` under ``output`` (beside its ``best/``) -> the card."""
    card = model_card(loaded, cfg, cache, metrics)
    storage.write_text(storage.join(output, CARD_JSON), json.dumps(card, indent=2, default=str), cfg.storage)
    storage.write_text(storage.join(output, CARD_MD), _markdown(card), cfg.storage)
    return card

