"""The class hierarchy: main classes, the subclasses inside each, and their encodings.

Leaves are the (main, sub) pairs, numbered main by main in config order; a leaf's name is
``"main/sub"``. The model needs two things from here: which main class owns each leaf
(:attr:`Taxonomy.leaf_main`) and the main x leaf membership mask (:attr:`Taxonomy.leaf_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medhier.config import TaxonomyConfig

__all__ = ["Taxonomy", "TaxonomyError", "UNLABELLED"]

UNLABELLED = -1  # label index of a row without a label


class TaxonomyError(ValueError):
    """A hierarchy or label that does not fit the configured taxonomy."""


@dataclass(frozen=True)
class Taxonomy:
    """An immutable main -> subclasses hierarchy. Build with :meth:`from_config` or :meth:`from_dict`."""

    mains: tuple[str, ...]
    subs: tuple[tuple[str, ...], ...]  # subs[m] = subclasses of mains[m], in order
    severity: tuple[str, ...] = ()  # leaf names from least to most severe

    def __post_init__(self) -> None:
        self._check("taxonomy")

    @classmethod
    def from_dict(cls, classes: dict[str, Any], severity: list[str] | tuple[str, ...] = (), where: str = "taxonomy") -> Taxonomy:
        """``{"fracture": ["compression", "burst"], ...}`` -> Taxonomy; errors name ``where``."""
        if not isinstance(classes, dict) or not classes:
            raise TaxonomyError(
                f"{where}.classes: need at least one main class, as a mapping main -> [subclasses]; got {classes!r}"
            )
        mains, subs = [], []
        for main, sub_list in classes.items():
            if not isinstance(sub_list, (list, tuple)):
                raise TaxonomyError(
                    f"{where}.classes.{main}: need a list of subclasses, got {sub_list!r}"
                )
            mains.append(str(main))
            subs.append(tuple(str(s) for s in sub_list))
        severity = tuple(severity) or ()
        obj = object.__new__(cls)
        object.__setattr__(obj, "mains", tuple(mains))
        object.__setattr__(obj, "subs", tuple(subs))
        object.__setattr__(obj, "severity", tuple(severity))
        obj._check(where)
        return obj

    @classmethod
    def from_config(cls, cfg: TaxonomyConfig, where: str = "taxonomy") -> Taxonomy:
        return cls.from_dict(cfg.classes, cfg.severity, where=where)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, stored in caches and checkpoints so that they describe themselves."""
        return {
            "classes": {m: list(s) for m, s in zip(self.mains, self.subs)},
            "severity": list(self.severity),
        }

    def _check(self, where: str) -> None:
        if not self.mains:
            raise TaxonomyError(f"{where}.classes: at least one main class is required")
        seen: set[str] = set()
        for main, subs in zip(self.mains, self.subs):
            if not main or "/" in main:
                raise TaxonomyError(f"{where}.classes: main class name {main!r} must be non-empty and contain no '/'")
            if main in seen:
                raise TaxonomyError(f"{where}.classes: main class {main!r} appears twice")
            seen.add(main)
            if not subs:
                raise TaxonomyError(
                    f"{where}.classes.{main}: every main class needs at least one subclass "
                    f"(use [{main}] for a main class without subtypes)"
                )
            if len(set(subs)) != len(subs):
                raise TaxonomyError(f"{where}.classes.{main}: subclass names must be unique, got {list(subs)}")
            for sub in subs:
                if not sub or "/" in sub:
                    raise TaxonomyError(
                        f"{where}.classes.{main}: subclass name {sub!r} must be non-empty and contain no '/'"
                    )
        names = set(self.leaf_names)
        for leaf in self.severity:
            if leaf not in names:
                raise TaxonomyError(
                    f"{where}.severity: {leaf!r} is not a leaf; leaves are {list(self.leaf_names)}"
                )
        if self.severity and len(set(self.severity)) != len(self.leaf_names):
            missing = [n for n in self.leaf_names if n not in self.severity]
            raise TaxonomyError(f"{where}.severity: must list every leaf once; missing {missing}")

    # -- sizes and names ------------------------------------------------------------------

    @property
    def num_mains(self) -> int:
        return len(self.mains)

    @property
    def num_leaves(self) -> int:
        return sum(len(s) for s in self.subs)

    @property
    def max_subs(self) -> int:
        return max(len(s) for s in self.subs)

    @cached_property
    def leaves(self) -> tuple[tuple[str, str], ...]:
        return tuple((m, s) for m, subs in zip(self.mains, self.subs) for s in subs)

    @cached_property
    def leaf_names(self) -> tuple[str, ...]:
        return tuple(f"{m}/{s}" for m, s in self.leaves)

    @cached_property
    def leaf_main(self) -> np.ndarray:
        """(num_leaves,) int64: the main-class index owning each leaf."""
        return np.array([i for i, subs in enumerate(self.subs) for _ in subs], dtype=np.int64)

    @cached_property
    def leaf_sub(self) -> np.ndarray:
        """(num_leaves,) int64: each leaf's index among its main class's subclasses."""
        return np.array([j for subs in self.subs for j in range(len(subs))], dtype=np.int64)

    @cached_property
    def leaf_mask(self) -> np.ndarray:
        """(num_mains, num_leaves) bool: ``mask[m, l]`` is True when leaf l belongs to main m."""
        mask = np.zeros((self.num_mains, self.num_leaves), dtype=bool)
        mask[self.leaf_main, np.arange(self.num_leaves)] = True
        return mask

    @cached_property
    def severity_rank(self) -> np.ndarray:
        """(num_leaves,) int64: rank of each leaf from least (0) to most severe."""
        order = self.severity or self.leaf_names
        rank = {name: i for i, name in enumerate(order)}
        return np.array([rank[n] for n in self.leaf_names], dtype=np.int64)

    # -- encoding -------------------------------------------------------------------------

    def main_index(self, main: str) -> int:
        try:
            return self.mains.index(main)
        except ValueError:
            raise TaxonomyError(f"unknown main class {main!r}; known: {list(self.mains)}") from None

    def leaf_index(self, main: str, sub: str) -> int:
        """(main, sub) -> global leaf index; raises naming the unknown class."""
        m = self.main_index(main)
        subs = self.subs[m]
        if sub not in subs:
            raise TaxonomyError(f"unknown subclass {sub!r} of {main!r}; known: {list(subs)}")
        return sum(len(s) for s in self.subs[:m]) + subs.index(sub)

    def encode(self, main: str, sub: str) -> tuple[int, int, int]:
        """(main, sub) names -> (main index, subclass index within main, leaf index)."""
        leaf = self.leaf_index(main, sub)
        return self.main_index(main), int(self.leaf_sub[leaf]), leaf

    def decode_leaf(self, leaf: int) -> tuple[str, str]:
        return self.leaves[leaf]
