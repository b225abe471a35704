"""``medhier`` command line: one subcommand per library entry point.

Every subcommand takes ``--config FILE`` and trailing ``section.key=value`` overrides, and
``--verbose`` for Ray's and medhier's INFO logs (without it, Ray's own noise is kept off the
console: medhier.console). Errors a user can cause print one line naming the input and exit
with status 2. SIGTERM and Ctrl-C (medhier.stopping) print one line, what was committed and the
command that continues, stop Ray, and exit with 143 and 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence

from medhier import console, stopping
from medhier.classify.taxonomy import TaxonomyError
from medhier.config import Config, ConfigError, load_config
from medhier.io import storage
from medhier.stopping import Stopped

__all__ = ["main"]

EXIT_USAGE = 2  # a user error: bad config, missing input, ...
EXIT_ERROR_RATE = 3  # the run worked, but more files failed to decode than --max-error-rate allows
EXIT_UNDELIVERED = 4  # the run committed, but some results could not be stored in the PACS (the next run retries)
EXIT_FAILED = 1  # the run failed, e.g. the archive stopped answering; nothing was committed


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="", help="YAML config file (local path or s3:// URI)")
    parser.add_argument("--verbose", "-v", action="store_true", help="show INFO logs from medhier and Ray")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied last")


def build_parser() -> argparse.ArgumentParser:
    """Every command and flag.

    Long: kept in one place, it reads as the command line's reference."""
    parser = argparse.ArgumentParser(prog="medhier", description="Hierarchical medical-image classification on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate a phantom CT archive with labels.csv")
    p.add_argument("--out", required=True, help="archive URI (local folder or s3://bucket/prefix)")
    p.add_argument("--n", type=int, default=120, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--difficulty", type=float, default=0.3, help="0 (easy) .. 1 (hard)")
    p.add_argument("--workers", type=int, default=1, help="render processes")
    p.add_argument("--broken", action="store_true", help="also write files that must be rejected (under broken/)")
    _common(p)

    p = sub.add_parser("prepare", help="decode and preprocess an archive into the cache")
    p.add_argument("--archive", required=True, help="archive URI (local folder, s3://bucket/prefix or dicomweb+http(s)://host/prefix)")
    p.add_argument("--output", required=True, help="cache URI")
    p.add_argument("--labels", default="", help="labels manifest (CSV/Parquet); default <archive>/labels.csv")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache is up to date")
    _common(p)

    p = sub.add_parser("train", help="train the hierarchical model with Ray Train (DDP)")
    p.add_argument("--archive", required=True, help="archive URI (local folder, s3://bucket/prefix or dicomweb+http(s)://host/prefix)")
    p.add_argument("--labels", default="", help="labels manifest (CSV/Parquet); default <archive>/labels.csv")
    p.add_argument("--output", required=True, help="run directory (local or s3://); re-running resumes")
    _common(p)

    p = sub.add_parser("evaluate", help="clinical metrics of a checkpoint on a labelled archive")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. <train output>/best)")
    p.add_argument("--archive", required=True)
    p.add_argument("--labels", default="")
    p.add_argument("--output", required=True, help="where metrics.json and plots/ go")
    _common(p)

    p = sub.add_parser("tune", help="search fine-tuning depth and learning rates with Ray Tune (ASHA)")
    p.add_argument("--archive", required=True, help="archive URI (local folder, s3://bucket/prefix or dicomweb+http(s)://host/prefix)")
    p.add_argument("--labels", default="", help="labels manifest (CSV/Parquet); default <archive>/labels.csv")
    p.add_argument("--output", required=True, help="search directory (local or s3://)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --output")
    _common(p)

    p = sub.add_parser("score", help="score an archive into a Parquet report (incremental, crash-safe)")
    p.add_argument("--archive", required=True, help="archive URI (local folder, s3://bucket/prefix or dicomweb+http(s)://host/prefix)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. <train output>/best)")
    p.add_argument("--output", required=True, help="report root (local or s3://); holds the ledger")
    p.add_argument("--full", action="store_true", help="rescore everything, not only new or changed objects")
    p.add_argument("--max-error-rate", type=float, default=None,
                   help="exit with status 3 when more than this share of the scored files are error rows")
    p.add_argument("--explain", action="store_true", help="Grad-CAM overlays for the rows score.explain_* selects")
    p.add_argument("--sr", action="store_true", help="a DICOM SR (TID 1500) per scored image, for the PACS")
    p.add_argument("--sr-to", default="", metavar="URI",
                   help="also store the SRs in a PACS with STOW-RS (dicomweb+http(s)://host/prefix; implies --sr); "
                        "credentials from MEDHIER_DICOMWEB_TOKEN or MEDHIER_DICOMWEB_USER/_PASSWORD")
    _common(p)

    p = sub.add_parser("explain", help="Grad-CAM overlays of one DICOM file for both heads")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. <train output>/best)")
    p.add_argument("--input", required=True, help="a DICOM file (local path or s3:// URI)")
    p.add_argument("--output", required=True, help="directory for gradcam_main.png / gradcam_sub.png")
    p.add_argument("--level", choices=["main", "sub", "both"], default="both")
    p.add_argument("--target", default=None, help="class to explain (e.g. fracture or fracture/burst); default: the prediction")
    p.add_argument("--stage", choices=["layer3", "layer4"], default="layer4", help="ResNet stage the map is computed on")
    _common(p)

    p = sub.add_parser("serve", help="serve POST /predict for a checkpoint with Ray Serve")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. <train output>/best)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port)")
    _common(p)

    p = sub.add_parser("plaque", help="longitudinal carotid plaque change: phantoms, measurements, the segmentation model")
    plaque = p.add_subparsers(dest="plaque_command", required=True)
    q = plaque.add_parser("synth", help="generate a phantom carotid MR archive (visits, SEGs, patients.csv, truth)")
    q.add_argument("--out", required=True, help="archive URI (local folder or s3://bucket/prefix)")
    q.add_argument("--patients", type=int, default=4, help="number of patients (2-3 visits each)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--broken", action="store_true", help="also write series that must be rejected (under broken/)")
    _common(q)
    q = plaque.add_parser("measure", help="measure every visit of an archive into a Parquet report (incremental, crash-safe)")
    q.add_argument("--archive", required=True, help="archive URI (local folder or s3://bucket/prefix)")
    q.add_argument("--output", required=True, help="report root (local or s3://); holds the ledger and visits.parquet")
    q.add_argument("--segmentations", default="",
                   help="label maps named <StudyInstanceUID>.dcm (DICOM SEG) or .nii/.nii.gz (NIfTI); "
                        "default: the DICOM SEG objects in each study")
    q.add_argument("--full", action="store_true", help="measure every visit again, not only new or changed ones")
    _common(q)
    for name, what in (("fit", "fit the change-factor prediction model (XGBoost on Ray Train) against mean and ridge baselines"),
                       ("tune", "search the prediction model's XGBoost parameters with Ray Tune, then fit the best")):
        q = plaque.add_parser(name, help=what)
        q.add_argument("--measurements", required=True,
                       help="visit measurements: a `medhier plaque measure` output, or a Parquet file/folder with its report's columns")
        q.add_argument("--patients", required=True, help="the patients' records: CSV or Parquet keyed by patient_key or patient_id")
        q.add_argument("--output", required=True, help="where the model, metrics.json and plots go (local or s3://)")
        if name == "tune":
            q.add_argument("--resume", action="store_true", help="continue an interrupted search in --output")
        _common(q)
    q = plaque.add_parser("predict", help="predict the change factors of every patient's latest visit (incremental, crash-safe)")
    q.add_argument("--archive", required=True, help="archive URI (local folder or s3://bucket/prefix)")
    q.add_argument("--patients", required=True, help="the patients' records: CSV or Parquet keyed by patient_key or patient_id")
    q.add_argument("--model", required=True, help="a `medhier plaque fit` output (or its model/ folder)")
    q.add_argument("--output", required=True, help="report root (local or s3://); holds the ledger")
    q.add_argument("--segmentations", default="",
                   help="label maps named <StudyInstanceUID>.dcm/.nii/.nii.gz; default: the DICOM SEG objects in each study")
    q.add_argument("--seg-checkpoint", default="",
                   help="segment each visit with this segmentation model (a `medhier plaque train-seg` checkpoint, e.g. "
                        "<output>/best) instead of the study's SEGs")
    q.add_argument("--full", action="store_true", help="predict every latest visit again, not only new or changed ones")
    _common(q)
    q = plaque.add_parser("demo", help="the plaque job end to end on phantoms, on a local Ray")
    q.add_argument("--workdir", default="medhier-plaque-demo", help="where the archives and outputs go")
    _common(q)
    q = plaque.add_parser("train-seg", help="train the plaque segmentation model (MONAI U-Net, Ray Train DDP) and evaluate it")
    q.add_argument("--archive", required=True, help="archive URI with a DICOM SEG per labelled visit")
    q.add_argument("--output", required=True, help="run directory (local or s3://); re-running resumes")
    _common(q)
    q = plaque.add_parser("segment", help="segment every visit with a trained model: a DICOM SEG and the measurements per visit")
    q.add_argument("--archive", required=True, help="archive URI (local folder or s3://bucket/prefix)")
    q.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. <train-seg output>/best)")
    q.add_argument("--output", required=True, help="report root (local or s3://); holds the ledger, the SEGs and visits.parquet")
    q.add_argument("--full", action="store_true", help="segment every visit again, not only new or changed ones")
    _common(q)

    p = sub.add_parser("export", help="the model as an ONNX file, checked against PyTorch with onnxruntime first")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. <train output>/best)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="file format (onnx)")
    p.add_argument("--output", required=True, help="the file to write (local path or s3:// URI)")
    p.add_argument("--samples", default="", help="archive whose first DICOMs check the file (default: phantom CT slices)")
    p.add_argument("--n-samples", type=int, default=32, help="images the check runs on")
    _common(p)

    p = sub.add_parser("demo", help="end to end on a generated phantom archive, on a local Ray")
    p.add_argument("--workdir", default="medhier-demo", help="where the archive and outputs go")
    _common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    stopping.install()
    if not args.verbose:
        console.hide_ray_noise()
    name = " ".join(filter(None, (args.command, getattr(args, "plaque_command", None))))
    try:
        cfg = load_config(args.config or None, args.overrides)
        return _COMMANDS[args.command](args, cfg)
    except (ConfigError, TaxonomyError, FileNotFoundError, ValueError) as exc:
        print(f"medhier {name}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except storage.ArchiveUnavailable as exc:  # before a run, or from inside one (Ray's error is then an instance of it)
        print(f"medhier {name}: error: {getattr(exc, 'cause', None) or exc}", file=sys.stderr)
        return EXIT_FAILED
    except Stopped as stop:
        again = argv + (["--resume"] if args.command == "tune" and not args.resume else [])
        print(f"medhier {name}: stopped by {stop.name}. Committed: {stop.committed or 'nothing'}. "
              f"To continue, re-run: {shlex.join(['medhier', *again])}", file=sys.stderr, flush=True)
        if "ray" in sys.modules:  # Ray was started: stop it and every process it started
            from medhier.runtime import shutdown_ray  # already loaded with Ray

            shutdown_ray()
        return stop.exit_code
    finally:
        console.restore_output()
        stopping.uninstall()


# Each command imports the library it calls when it runs: torch and Ray take seconds to import,
# and `medhier synth`, `--help` or a usage error should not wait for them.


def _synth(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.classify.taxonomy import Taxonomy  # the phantoms need neither torch nor Ray: not loaded at start-up
    from medhier.runtime import set_verbosity
    from medhier.synthetic import spine

    set_verbosity(args.verbose)
    try:
        summary = spine.generate_archive(args.out, args.n, seed=args.seed, size=args.size, difficulty=args.difficulty,
                                         taxonomy=Taxonomy.from_config(cfg.taxonomy), storage_cfg=cfg.storage,
                                         patient_salt=cfg.dicom.patient_salt, workers=args.workers)
    except Stopped as stop:
        stop.note(f"part of the archive at {args.out} (a re-run writes it again)")
        raise
    print(summary.table())
    if args.broken:
        broken = spine.add_broken_files(args.out, cfg.storage, seed=args.seed)
        print(f"broken files     {len(broken)} under broken/ ({', '.join(sorted(set(broken.values())))})")
    return 0


def _prepare(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.classify.api import prepare  # heavy (torch, Ray): only when this command runs
    from medhier.runtime import init_ray

    _require("archive", args.archive, cfg)
    init_ray(cfg.runtime, verbose=args.verbose)
    print(prepare(cfg, args.archive, args.output, labels=args.labels, force=args.force).table())
    return 0


def _require(what: str, uri: str, cfg: Config, inside: str = "") -> None:
    """Fail before Ray starts (seconds) when an input is plainly missing."""
    target = storage.join(uri, inside) if inside else uri
    if not storage.exists(target, cfg.storage):
        raise FileNotFoundError(f"{what} {uri!r} not found" + (f" (no {inside} in it)" if inside else ""))


def _train(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.classify.api import fit  # heavy (torch, Ray): only when this command runs
    from medhier.runtime import init_ray

    _require("archive", args.archive, cfg)
    init_ray(cfg.runtime, verbose=args.verbose)
    print(fit(cfg, args.archive, args.output, labels=args.labels).table())
    return 0


def _evaluate(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.classify.api import evaluate_archive  # heavy (torch, Ray): only when this command runs
    from medhier.classify.metrics import summary_table
    from medhier.runtime import init_ray

    _require("checkpoint", args.checkpoint, cfg, "model.pt")
    _require("archive", args.archive, cfg)
    init_ray(cfg.runtime, verbose=args.verbose)
    print(summary_table(evaluate_archive(cfg, args.checkpoint, args.archive, args.output, labels=args.labels)))
    return 0


def _tune(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.classify.api import tune  # heavy (torch, Ray): only when this command runs
    from medhier.runtime import init_ray
    from medhier.train.tune import search_space

    search_space(cfg)  # a bad search space fails here, before Ray starts
    _require("archive", args.archive, cfg)
    init_ray(cfg.runtime, verbose=args.verbose)
    print(tune(cfg, args.archive, args.output, labels=args.labels, resume=args.resume).table())
    return 0


def _score(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.classify.score import score  # heavy (torch, Ray): only when this command runs
    from medhier.runtime import init_ray

    _require("checkpoint", args.checkpoint, cfg, "model.pt")
    _require("archive", args.archive, cfg)
    if args.sr_to:  # a malformed destination fails here, before Ray starts
        if not storage.is_dicomweb(args.sr_to):
            raise ValueError(f"--sr-to {args.sr_to!r}: a PACS's DICOMweb URI is needed (dicomweb+http(s)://host/prefix)")
        storage.normalize(args.sr_to)
    init_ray(cfg.runtime, verbose=args.verbose)
    summary = score(cfg, args.archive, args.checkpoint, args.output, full=args.full, explain=args.explain, sr=args.sr,
                    sr_to=args.sr_to)
    print(summary.table())
    limit = args.max_error_rate if args.max_error_rate is not None else cfg.score.max_error_rate
    if limit >= 0 and summary.error_rate > limit:
        print(f"medhier score: error rate {summary.error_rate:.1%} exceeds --max-error-rate {limit:.1%}", file=sys.stderr)
        return EXIT_ERROR_RATE
    if summary.undelivered:
        print(f"medhier score: {summary.undelivered:,} SRs not stored in {args.sr_to} (recorded under deliveries/; "
              "the next run retries them)", file=sys.stderr)
        return EXIT_UNDELIVERED
    return 0


def _explain(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.classify.explain import explain_dicom  # heavy (torch): only when this command runs
    from medhier.runtime import set_verbosity

    set_verbosity(args.verbose)
    _require("checkpoint", args.checkpoint, cfg, "model.pt")
    try:
        data = storage.read_bytes(storage.normalize(args.input), cfg.storage)
    except FileNotFoundError:
        raise FileNotFoundError(f"input {args.input!r} not found") from None
    result = explain_dicom(args.checkpoint, data, args.output, storage_cfg=cfg.storage, level=args.level,
                           target=args.target, stage=args.stage, source=args.input)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _serve(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.classify.task import CLASSIFY  # heavy (torch, Ray): only when this command runs
    from medhier.infer.serve import run
    from medhier.runtime import init_ray

    _require("checkpoint", args.checkpoint, cfg, "model.pt")
    if args.port is not None:
        cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, port=args.port))
    init_ray(cfg.runtime, verbose=args.verbose)
    run(cfg, args.checkpoint, CLASSIFY, blocking=True)
    return 0


def _plaque(args: argparse.Namespace, cfg: Config) -> int:
    commands = {"synth": _plaque_synth, "measure": _plaque_measure, "train-seg": _plaque_train_seg, "segment": _plaque_segment,
                "fit": _plaque_fit, "tune": _plaque_tune, "predict": _plaque_predict, "demo": _plaque_demo}
    return commands[args.plaque_command](args, cfg)


def _plaque_synth(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.synthetic import carotid  # the phantoms need neither torch nor Ray: not loaded at start-up
    from medhier.runtime import set_verbosity

    set_verbosity(args.verbose)
    if args.patients < 1:
        raise ValueError(f"--patients must be at least 1, got {args.patients}")
    summary = carotid.generate_plaque_archive(args.out, args.patients, seed=args.seed, storage_cfg=cfg.storage,
                                              patient_salt=cfg.dicom.patient_salt, broken=args.broken)
    print(summary.table())
    return 0


def _plaque_measure(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.plaque.api import measure_archive  # heavy (Ray, SimpleITK): only when this command runs
    from medhier.runtime import init_ray

    _require("archive", args.archive, cfg)
    if args.segmentations:
        _require("segmentations", args.segmentations, cfg)
    init_ray(cfg.runtime, verbose=args.verbose)
    print(measure_archive(cfg, args.archive, args.output, segmentations=args.segmentations, full=args.full).table())
    return 0


def _plaque_train_seg(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.plaque.seg_train import train_segmentation  # heavy (torch, MONAI, Ray): only when this command runs
    from medhier.runtime import init_ray

    _require("archive", args.archive, cfg)
    init_ray(cfg.runtime, verbose=args.verbose)
    print(train_segmentation(cfg, args.archive, args.output).table())
    return 0


def _plaque_segment(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.plaque.segment import segment_archive  # heavy (torch, MONAI, Ray): only when this command runs
    from medhier.runtime import init_ray

    _require("checkpoint", args.checkpoint, cfg, "model.pt")
    _require("archive", args.archive, cfg)
    init_ray(cfg.runtime, verbose=args.verbose)
    print(segment_archive(cfg, args.archive, args.checkpoint, args.output, full=args.full).table())
    return 0


def _check_patients(uri: str, cfg: Config, model: str = "") -> None:
    """A patients table that does not match the covariates (the model's, when given) fails
    here, naming the column, before Ray starts."""
    from medhier.plaque.patients import read_patients  # reads one small table; the model loads xgboost, not Ray

    _require("patients", uri, cfg)
    covariates = cfg.predict.covariates
    if model:
        from medhier.plaque.model import load_model  # xgboost, not Ray: only when this command runs

        covariates = load_model(model, cfg.storage).space.covariate_specs
    read_patients(uri, covariates, cfg.storage, cfg.dicom.patient_salt)


def _plaque_fit(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.plaque.fit import fit_model  # heavy (Ray, XGBoost): only when this command runs
    from medhier.runtime import init_ray

    _require("measurements", args.measurements, cfg)
    _check_patients(args.patients, cfg)
    init_ray(cfg.runtime, verbose=args.verbose)
    print(fit_model(cfg, args.measurements, args.patients, args.output).table())
    return 0


def _plaque_tune(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.plaque.tune import plaque_space, tune_model  # heavy (Ray Tune, XGBoost): only when this command runs
    from medhier.runtime import init_ray

    plaque_space(cfg)  # a bad search space fails here, before Ray starts
    if not args.resume:
        _require("measurements", args.measurements, cfg)
        _check_patients(args.patients, cfg)
    init_ray(cfg.runtime, verbose=args.verbose)
    print(tune_model(cfg, args.measurements, args.patients, args.output, resume=args.resume).table())
    return 0


def _plaque_predict(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.plaque.predict import predict_archive, seg_model_source  # heavy (Ray, SimpleITK, XGBoost): only when this command runs
    from medhier.runtime import init_ray

    _require("archive", args.archive, cfg)
    _require("model", args.model, cfg)
    _check_patients(args.patients, cfg, model=args.model)
    if args.segmentations:
        _require("segmentations", args.segmentations, cfg)
    if args.segmentations and args.seg_checkpoint:
        raise ValueError("--segmentations and --seg-checkpoint are two segmentation sources: name one")
    if args.seg_checkpoint:
        _require("seg checkpoint", args.seg_checkpoint, cfg, "model.pt")
        seg_model_source(cfg, args.seg_checkpoint)  # another task's checkpoint or sequences the config lacks fail here, before Ray starts
    init_ray(cfg.runtime, verbose=args.verbose)
    summary = predict_archive(cfg, args.archive, args.patients, args.model, args.output,
                              segmentations=args.segmentations, seg_checkpoint=args.seg_checkpoint, full=args.full)
    print(summary.table())
    return 0


def _plaque_demo(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.plaque.demo import plaque_demo_config, run_plaque_demo  # heavy (Ray, XGBoost): only when this command runs

    return run_plaque_demo(args.workdir, cfg if args.config else plaque_demo_config(args.overrides), verbose=args.verbose)


def _export(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.classify.api import export  # heavy (torch, onnx): only when this command runs
    from medhier.runtime import set_verbosity

    set_verbosity(args.verbose)
    _require("checkpoint", args.checkpoint, cfg, "model.pt")
    print(export(cfg, args.checkpoint, args.output, fmt=args.format, samples=args.samples, n_samples=args.n_samples).table())
    return 0


def _demo(args: argparse.Namespace, cfg: Config) -> int:
    from medhier.demo import demo_config, run_demo  # heavy (torch, Ray): only when this command runs

    # the demo's embedded defaults, unless a config file is given; overrides apply either way
    return run_demo(args.workdir, cfg if args.config else demo_config(args.overrides), verbose=args.verbose)


_COMMANDS = {"synth": _synth, "prepare": _prepare, "train": _train, "evaluate": _evaluate, "tune": _tune, "score": _score,
             "explain": _explain, "serve": _serve, "export": _export, "plaque": _plaque, "demo": _demo}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
