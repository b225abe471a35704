"""A PACS against a folder, side by side in one run on the same phantom files: instances per second
(a) listed and fetched the way decode tasks fetch (``storage.list_objects`` + ``storage.reader``,
``storage.read_threads`` GETs at a time) and (b) scored end to end (``medhier score``: list,
fetch, decode, model, report), from a local folder and from Orthanc over DICOMweb (QIDO-RS,
WADO-RS). Also (c): SRs stored per second with STOW-RS (``--sr-to``'s delivery after the commit).

    python benchmarks/dicomweb.py [--n 200] [--size 256] [--arch resnet18] [--image-size 64] [--rounds 2]

Orthanc is the Debian package with its DICOMweb plugin (``apt-get install orthanc
orthanc-dicomweb``), started on 127.0.0.1 by tests/orthanc.py (its own storage, ports, and
a bearer token); the archive is uploaded to it first (Orthanc's REST upload, timed for
information). Each measurement runs ``--rounds`` times, the two sources' order alternating, after
a warm-up run that starts Ray's workers; the table gives medians. A small model at a small input
(ResNet18 at 64 px, random weights: throughput does not depend on them) keeps the model from
hiding what the source costs. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ["MEDHIER_DICOMWEB_TOKEN"] = "bench-" + secrets.token_hex(8)  # before Ray starts: its workers fetch too

from medhier.classify.score import score  # noqa: E402
from medhier.config import load_config  # noqa: E402
from medhier.infer.deliver import Delivery, deliver  # noqa: E402
from medhier.infer.ledger import Ledger, new_run_id  # noqa: E402
from medhier.io import storage  # noqa: E402
from medhier.runtime import init_ray, shutdown_ray  # noqa: E402
from medhier.synthetic import spine as synthetic  # noqa: E402
from common import machine, make_checkpoint, read_through  # noqa: E402
from tests.orthanc import Orthanc  # noqa: E402


def fetch_rate(uri: str, cfg) -> tuple[float, float, int]:
    """List and fetch every object as a decode task does -> (listing s, instances/s over listing
    and fetching, instances)."""
    start = time.perf_counter()
    paths = [o.path for page in storage.list_objects(uri, cfg, exclude=["*.csv"]) for o in page]
    listed = time.perf_counter() - start
    read = storage.reader(uri, cfg)
    with ThreadPoolExecutor(cfg.read_threads) as pool:
        size = sum(len(b) for b in pool.map(read, paths))
    assert size > 0
    return listed, len(paths) / (time.perf_counter() - start), len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="phantom instances")
    parser.add_argument("--size", type=int, default=256, help="phantom side in pixels")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each measurement, the sources' order alternating")
    parser.add_argument("--workdir", default="/tmp/medhier-bench")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    archive = workdir / f"dicomweb-archive-{args.n}-{args.size}"
    if not (archive / "labels.csv").exists():
        shutil.rmtree(archive, ignore_errors=True)
        synthetic.generate_archive(str(archive), args.n, seed=17, size=args.size, compressed_fraction=0.2, workers=os.cpu_count() or 1)
    warm = workdir / "dicomweb-warm-up"
    if not (warm / "labels.csv").exists():
        synthetic.generate_archive(str(warm), 16, seed=18, size=args.size)
    checkpoint = make_checkpoint(str(workdir), args.arch, args.image_size)
    read_through([str(p) for p in archive.rglob("*.dcm")])
    cfg = load_config(None, [f"preprocess.image_size={args.image_size}", "dicom.windows.CT=bone", "runtime.progress=false",
                             "data.decode_batch_size=50", "score.compile=false"])

    with tempfile.TemporaryDirectory(prefix="medhier-orthanc-") as tmp:
        pacs = Orthanc(Path(tmp), os.environ["MEDHIER_DICOMWEB_TOKEN"])
        pacs.start()
        try:
            start = time.perf_counter()
            loaded = pacs.load(archive)
            upload = len(loaded.objects) / (time.perf_counter() - start)
            assert not loaded.refused, loaded.refused
            sources = [("folder", str(archive)), ("Orthanc (DICOMweb)", pacs.uri)]
            fetch: dict[str, list] = {name: [] for name, _ in sources}
            scored: dict[str, list] = {name: [] for name, _ in sources}
            for r in range(args.rounds):
                for name, uri in sources[:: 1 if r % 2 == 0 else -1]:
                    fetch[name].append(fetch_rate(uri, cfg.storage))
            init_ray(cfg.runtime)
            try:
                score(cfg, str(warm), checkpoint, str(Path(tmp) / "warm-up"))  # Ray's workers and the actor's imports, once
                for r in range(args.rounds):
                    for name, uri in sources[:: 1 if r % 2 == 0 else -1]:
                        start = time.perf_counter()
                        summary = score(cfg, uri, checkpoint, str(Path(tmp) / f"out-{name[:6]}-{r}"))
                        scored[name].append((summary.files / (time.perf_counter() - start), summary.images_per_s, summary.files))
                out = Path(tmp) / "out-sr"  # SR files to send: scored again, with --sr, from the folder
                score(cfg, str(archive), checkpoint, str(out), sr=True)
                start = time.perf_counter()
                sent = deliver(Ledger(str(out), cfg.storage), new_run_id(), Delivery("sr_path", pacs.uri))
                stow = sent.stored / (time.perf_counter() - start)
                assert sent.failed == 0, sent
            finally:
                shutdown_ray()
        finally:
            pacs.stop()

    print(f"\n{machine()} | {args.n} CT phantoms {args.size}x{args.size} (20 % compressed), {args.arch} at {args.image_size} px, "
          f"Orthanc 1.10 + DICOMweb plugin 1.7 on the same machine, {args.rounds} rounds | {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| source | what | instances | instances/s, median (each round) | notes |")
    print("| --- | --- | ---: | ---: | --- |")
    med = lambda values: statistics.median(values)  # noqa: E731
    for name, _ in sources:
        rates = [f[1] for f in fetch[name]]
        print(f"| {name} | list + fetch | {fetch[name][0][2]:,} | {med(rates):,.1f} ({', '.join(f'{v:,.1f}' for v in rates)}) | "
              f"listing {med([f[0] for f in fetch[name]]):.2f} s of it; {cfg.storage.read_threads} GETs at a time |")
    for name, _ in sources:
        rates = [s_[0] for s_ in scored[name]]
        print(f"| {name} | score end to end | {scored[name][0][2]:,} | {med(rates):,.1f} ({', '.join(f'{v:,.1f}' for v in rates)}) | "
              f"whole run; scoring stage {med([s_[1] for s_ in scored[name]]):,.1f} images/s |")
    f_ratio = med([f[1] for f in fetch["Orthanc (DICOMweb)"]]) / med([f[1] for f in fetch["folder"]])
    s_ratio = med([s_[0] for s_ in scored["Orthanc (DICOMweb)"]]) / med([s_[0] for s_ in scored["folder"]])
    print(f"\nOrthanc / folder: list + fetch {f_ratio:.4f}, score end to end {s_ratio:.2f}; "
          f"STOW-RS of {sent.stored} SRs: {stow:,.1f} SRs/s ({cfg.storage.dicomweb_stow_batch} per request, "
          f"{cfg.storage.dicomweb_stow_threads} requests at a time); loading Orthanc (REST upload, one at a time): {upload:,.1f} instances/s")


if __name__ == "__main__":
    main()
