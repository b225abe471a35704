"""Ingest throughput: decode + preprocess images/s per core, and the Ray Data pipeline's rate
against cores x the single-core rate, side by side in one run.

    python benchmarks/ingest.py [--n 3000] [--repeat 4] [--size 512] [--image-size 224] [--cpus 2]

On phantom CT files of --size px (generated once into --workdir), it measures:
  * single core, in process, per transfer syntax (uncompressed, RLE, JPEG 2000):
    medhier.dicom.decode + resize + uint8 from bytes in memory; and the direct pydicom way
    (dcmread, apply_modality_lut, apply_voi_lut) for reference;
  * single core, in process, the whole per-file work of a decode task: `decode_batch` on manifest
    batches (read the file, decode, resize, build the row) plus encoding the rows as the cache's
    Parquet: the rate the pipeline should reach per core;
  * the Ray Data pipeline `medhier prepare` runs (manifest -> decode tasks -> Parquet cache) with
    --cpus logical CPUs on a manifest listing the archive --repeat times (a large archive without
    the disk space: files are read again, from the page cache like the single-core runs), as
    images/s and as a share of cpus x the single-core per-file rate.
Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from medhier import storage, synthetic  # noqa: E402
from medhier.config import load_config  # noqa: E402
from medhier.dicom import decode  # noqa: E402
from medhier.preprocess import resize_image, to_uint8  # noqa: E402
from common import machine  # noqa: E402


def _files(root: str) -> list[str]:
    return [storage.join(root, o.path) for page in storage.list_objects(root, exclude=["*.csv"]) for o in page]


def make_archives(workdir: str, n: int, size: int) -> dict[str, str]:
    """Uncompressed archive of n files, plus RLE and JPEG 2000 transcodes of its first files."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless, RLELossless

    plain = os.path.join(workdir, f"plain-{n}-{size}")
    if not os.path.exists(os.path.join(plain, "labels.csv")):
        shutil.rmtree(plain, ignore_errors=True)
        synthetic.generate_archive(plain, n, seed=11, size=size, compressed_fraction=0.0, monochrome1_fraction=0.0, workers=os.cpu_count() or 1)
    out = {"uncompressed": plain}
    for name, uid in (("rle", RLELossless), ("j2k", JPEG2000Lossless)):
        root = os.path.join(workdir, f"{name}-{size}")
        if not os.path.isdir(root):
            os.makedirs(root)
            for i, path in enumerate(_files(plain)[:100]):
                ds = pydicom.dcmread(path)
                ds.compress(uid, encoding_plugin="pylibjpeg")
                ds.save_as(os.path.join(root, f"IM{i:04d}.dcm"), enforce_file_format=True)
        out[name] = root
    return out


def single_core_rate(paths: list[str], image_size: int, repeat: int = 3) -> float:
    """Images/s on one core: decode + resize + quantise, from bytes already in memory."""
    cfg = load_config().dicom
    blobs = [open(p, "rb").read() for p in paths]
    for blob in blobs[:5]:  # warm caches (LUTs, plugin imports)
        to_uint8(resize_image(decode(blob, cfg).pixels[0], image_size))
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        for blob in blobs:
            to_uint8(resize_image(decode(blob, cfg).pixels[0], image_size))
        rates.append(len(blobs) / (time.perf_counter() - t))
    return max(rates)  # best of n: the machine is shared, noise only ever slows a run down


def pydicom_direct_rate(paths: list[str], image_size: int) -> float:
    """The obvious way: dcmread, apply_modality_lut, apply_voi_lut, normalise, resize."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    blobs = [open(p, "rb").read() for p in paths]
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        for blob in blobs:
            ds = pydicom.dcmread(io.BytesIO(blob))
            v = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
            v = ((v - v.min()) / max(float(v.max() - v.min()), 1e-6)).astype(np.float32)
            to_uint8(resize_image(v, image_size))
        rates.append(len(blobs) / (time.perf_counter() - t))
    return max(rates)


def decode_task_rate(archive: str, image_size: int, workdir: str) -> float:
    """Images/s on one core for exactly what a decode task does per file, without Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medhier.data import decode_batch, decode_settings, write_manifest

    cfg = load_config(None, [f"preprocess.image_size={image_size}"])
    manifest = os.path.join(workdir, "single-manifest")
    write_manifest(archive, manifest, cfg.data, cfg.storage)
    table = pq.read_table(manifest).slice(0, 512)
    settings = decode_settings(cfg, archive, None)
    batches = [table.slice(i, 64) for i in range(0, table.num_rows, 64)]
    as_numpy = [{c: b.column(c).to_numpy(zero_copy_only=False) for c in b.column_names} for b in batches]
    decode_batch(as_numpy[0], settings)  # warm-up
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        for batch in as_numpy:
            rows = decode_batch(batch, settings)
            out = pa.table({k: pa.array(list(v)) if v.dtype == object else pa.array(v) for k, v in rows.items()})
            pq.write_table(out, io.BytesIO(), compression="zstd")
        rates.append(table.num_rows / (time.perf_counter() - t))
    return max(rates)  # best of 3: a high ideal makes the pipeline's ratio conservative


def pipeline_rate(archive: str, image_size: int, workdir: str, repeat: int) -> tuple[float, int, float]:
    """-> (images/s, images, seconds) of the decode+write stage of `medhier prepare`."""
    import pyarrow.parquet as pq
    import ray

    from medhier.data import build_ingest, decode_settings, write_manifest, write_rows
    from medhier.runtime import init_ray

    cfg = load_config(None, [f"preprocess.image_size={image_size}", "runtime.progress=false"])
    init_ray(cfg.runtime)  # medhier's default local Ray: 1.5 logical CPUs per core
    listing = os.path.join(workdir, "bench-listing")
    write_manifest(archive, listing, cfg.data, cfg.storage)
    table = pq.read_table(listing)
    manifest = os.path.join(workdir, "bench-manifest")
    shutil.rmtree(manifest, ignore_errors=True)
    os.makedirs(manifest)
    for i in range(repeat):
        pq.write_table(table, os.path.join(manifest, f"part-{i:05d}.parquet"), row_group_size=cfg.data.decode_batch_size)
    n = table.num_rows * repeat
    out = os.path.join(workdir, "bench-rows")
    best = None
    for _ in range(2):  # the first run also starts worker processes and imports
        shutil.rmtree(out, ignore_errors=True)
        ds = build_ingest(manifest, decode_settings(cfg, archive, None), cfg.data)
        t = time.perf_counter()
        write_rows(ds, out, None)
        seconds = time.perf_counter() - t
        best = seconds if best is None else min(best, seconds)
    ray.shutdown()
    return n / best, n, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=4, help="times the manifest lists the archive")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="cores the ideal is computed for")
    parser.add_argument("--workdir", default="/tmp/medhier-bench")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)

    archives = make_archives(args.workdir, args.n, args.size)
    sample = {k: _files(v)[:100] for k, v in archives.items()}
    rows = []
    for name in ("uncompressed", "rle", "j2k"):
        rows.append((f"single core, {name}: decode + resize + uint8", single_core_rate(sample[name], args.image_size)))
    direct = pydicom_direct_rate(sample["uncompressed"], args.image_size)
    rows.append(("single core, uncompressed: direct pydicom (reference)", direct))
    task_rate = decode_task_rate(archives["uncompressed"], args.image_size, args.workdir)
    rows.append(("single core, uncompressed: a decode task's whole per-file work", task_rate))
    rate, n, seconds = pipeline_rate(archives["uncompressed"], args.image_size, args.workdir, args.repeat)
    ideal = args.cpus * task_rate

    print(f"\n{machine()} | "
          f"{args.size}x{args.size} CT -> {args.image_size}x{args.image_size} uint8 | {time.strftime('%Y-%m-%d')}\n")
    print("| measurement | images/s |")
    print("| --- | ---: |")
    for label, value in rows:
        print(f"| {label} | {value:,.0f} |")
    print(f"| Ray Data pipeline on {args.cpus} cores, {n:,} files, {seconds:.1f} s | {rate:,.0f} |")
    print(f"| ideal: {args.cpus} x a decode task's per-file rate | {ideal:,.0f} |")
    print(f"\npipeline / ideal = {rate / ideal:.1%} (target >= 90 %); "
          f"uncompressed per core = {rows[0][1]:,.0f} images/s (target >= 250); "
          f"LUT decode vs direct pydicom = {rows[0][1] / direct:.1f}x")


if __name__ == "__main__":
    main()
