"""The classifier's labels: a manifest's ``main`` and ``sub`` columns, encoded against the
taxonomy into the integer columns the cache and the training batches carry.

``main_index`` and ``leaf_index`` are integers (``-1`` on unlabelled rows); the report's
``main_label``/``leaf_label`` are class *names* (``medhier.classify.report``): two names for two
meanings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medhier import columns as C
from medhier.classify.taxonomy import Taxonomy, TaxonomyError

__all__ = ["LEAF_INDEX", "MAIN", "MAIN_INDEX", "SUB", "SUB_INDEX", "TRAIN_COLUMNS", "HierarchicalLabels"]

MAIN, SUB = "main", "sub"  # class names as the manifest gives them
MAIN_INDEX = "main_index"  # index of the main class in the taxonomy
SUB_INDEX = "sub_index"  # index of the subclass within its main class
LEAF_INDEX = "leaf_index"  # global leaf index (main, sub)
TRAIN_COLUMNS = (C.IMAGE, MAIN_INDEX, LEAF_INDEX)  # what a training batch needs from the cache


@dataclass(frozen=True)
class HierarchicalLabels:
    """The :class:`medhier.data.labels.LabelCodec` of the hierarchical classifier."""

    taxonomy: Taxonomy
    label_columns: tuple[str, ...] = (MAIN, SUB)
    index_columns: tuple[str, ...] = (MAIN_INDEX, SUB_INDEX, LEAF_INDEX)
    class_column: str = LEAF_INDEX
    class_noun: str = "leaf"

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.taxonomy.leaf_names

    def encode(self, values: dict[str, str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """{"main": ..., "sub": ...} -> ((main, sub), (main index, sub index, leaf index)). An
        empty ``sub`` is the main class's only subclass; raises TaxonomyError otherwise."""
        main, sub = values[MAIN], values[SUB]
        if not sub:
            subs = self.taxonomy.subs[self.taxonomy.main_index(main)]
            if len(subs) != 1:
                raise TaxonomyError(f"empty subclass for {main!r}, which has {list(subs)}")
            sub = subs[0]
        return (main, sub), self.taxonomy.encode(main, sub)

    def fingerprint(self) -> dict[str, Any]:
        return {"taxonomy": self.taxonomy.to_dict()}
