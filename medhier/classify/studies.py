"""The study roll-up: one row per study for a model, its most severe predicted leaf.

    OUTPUT/studies/<model_id>__<version>.parquet

Columns: ``study_instance_uid``, ``patient_key``, ``n_images``, ``most_severe_leaf`` (the most
severe predicted leaf over the study's images, in ``taxonomy.severity`` order),
``most_severe_main``, ``most_severe_sub``, ``most_severe_prob`` (that leaf's highest
probability), ``n_<main>__<sub>`` (images per predicted leaf), ``model_id``, ``model_version``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medhier import columns as C
from medhier.classify.report import LEAF_LABEL, LEAF_PROB
from medhier.classify.taxonomy import Taxonomy
from medhier.infer.ledger import Ledger
from medhier.io import storage

__all__ = ["write_studies"]


def write_studies(ledger: Ledger, taxonomy: Taxonomy, model_id: str, version: str) -> str:
    """Roll the committed report of ``model_id``/``version`` up per study -> the file's URI.

    Vectorised in Arrow (group-bys and a join), so archives of millions of rows roll up in seconds.
    """
    cols = [C.STUDY_INSTANCE_UID, C.PATIENT_KEY, C.STATUS, LEAF_LABEL, LEAF_PROB, C.MODEL_ID, C.MODEL_VERSION]
    table = ledger.report(columns=cols)
    keep = pc.and_(pc.and_(pc.equal(table[C.MODEL_ID], model_id), pc.equal(table[C.MODEL_VERSION], version)),
                   pc.equal(table[C.STATUS], C.STATUS_OK))
    table = table.filter(keep).select([C.STUDY_INSTANCE_UID, C.PATIENT_KEY, LEAF_LABEL, LEAF_PROB])
    names = list(taxonomy.leaf_names)
    ranks = pa.array(taxonomy.severity_rank, pa.int64())
    table = table.append_column("rank", pc.take(ranks, pc.index_in(table[LEAF_LABEL], value_set=pa.array(names))))
    study = C.STUDY_INSTANCE_UID
    per_study = table.group_by(study).aggregate([("rank", "max"), (C.PATIENT_KEY, "min"), (LEAF_LABEL, "count")])
    per_study = per_study.rename_columns([study, "worst_rank", C.PATIENT_KEY, "n_images"])
    worst = table.join(per_study.select([study, "worst_rank"]), keys=study)
    worst = worst.filter(pc.equal(worst["rank"], worst["worst_rank"]))
    worst = worst.group_by([study, LEAF_LABEL]).aggregate([(LEAF_PROB, "max")]).rename_columns([study, "most_severe_leaf", "most_severe_prob"])
    counts = table.group_by([study, LEAF_LABEL]).aggregate([(LEAF_PROB, "count")]).rename_columns([study, LEAF_LABEL, "n"])
    out = per_study.join(worst, keys=study).sort_by(study)
    leaf = out["most_severe_leaf"].to_pylist()
    columns = {
        study: out[study],
        C.PATIENT_KEY: out[C.PATIENT_KEY],
        "n_images": out["n_images"],
        "most_severe_leaf": out["most_severe_leaf"],
        "most_severe_main": pa.array([v.split("/")[0] for v in leaf], pa.string()),
        "most_severe_sub": pa.array([v.split("/")[1] for v in leaf], pa.string()),
        "most_severe_prob": pc.cast(out["most_severe_prob"], pa.float32()),
    }
    order = {uid: i for i, uid in enumerate(out[study].to_pylist())}
    for name in names:
        n = np.zeros(out.num_rows, np.int64)
        mine = counts.filter(pc.equal(counts[LEAF_LABEL], name))
        for uid, c in zip(mine[study].to_pylist(), mine["n"].to_pylist()):
            n[order[uid]] = c
        columns["n_" + name.replace("/", "__")] = pa.array(n)
    columns[C.MODEL_ID] = pa.array([model_id] * out.num_rows, pa.string())
    columns[C.MODEL_VERSION] = pa.array([version] * out.num_rows, pa.string())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink, compression="zstd")
    uri = storage.join(ledger.output, "studies", f"{model_id}__{version}.parquet")
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), ledger.storage)
    return uri
