"""Small tables as Ray datasets: the unit of work of tabular models (one row per example), for
trainers that shard their input with Ray Data (``XGBoostTrainer``'s ``datasets=``).

A table that a driver already holds in memory (thousands to a few million rows of numbers) is
handed to Ray as Arrow blocks; nothing is read from storage again.
"""

from __future__ import annotations

import pyarrow as pa
import ray.data

__all__ = ["table_dataset"]


def table_dataset(table: pa.Table, blocks: int = 1) -> ray.data.Dataset:
    """``table`` as a Ray dataset of about ``blocks`` equal Arrow blocks (a trainer splits a
    dataset between its workers by blocks and rows, so one block is enough for one worker)."""
    if blocks < 1:
        raise ValueError(f"blocks: need at least 1, got {blocks}")
    if table.num_rows == 0:
        raise ValueError("table_dataset: the table has no rows")
    size = -(-table.num_rows // blocks)
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)])
