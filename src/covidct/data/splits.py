"""Splits that never put one patient in two parts."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


def group_split(
    items: Sequence[T],
    groups: Sequence[Hashable | None],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[T], list[T]]:
    """Split ``items`` into (train, val) so that items of one group stay together.

    Items whose group is ``None`` form a group of their own each. Groups are shuffled with
    ``seed`` and taken into validation until it holds about ``val_fraction`` of the items.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be between 0 and 1")
    buckets: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        buckets[("__single__", i) if g is None else g].append(i)
    keys = sorted(buckets, key=str)
    random.Random(seed).shuffle(keys)
    target = val_fraction * len(items)
    val_idx: list[int] = []
    for k in keys:
        if len(val_idx) >= target:
            break
        val_idx.extend(buckets[k])
    val_set = set(val_idx)
    train = [it for i, it in enumerate(items) if i not in val_set]
    val = [it for i, it in enumerate(items) if i in val_set]
    return train, val


def group_kfold(
    items: Sequence[T],
    groups: Sequence[Hashable | None],
    *,
    n_folds: int,
    fold: int,
    seed: int = 0,
    strata: Sequence[Hashable] | None = None,
) -> tuple[list[T], list[T]]:
    """(train, val) for fold ``fold`` of ``n_folds`` with whole groups per fold.

    Groups are shuffled with ``seed``, then taken largest first (a stable sort, so groups of one
    item keep the shuffled order), each going to the fold that holds the fewest items so far: folds
    differ in size by at most one group; every item is validated exactly once over the ``n_folds``
    folds. With ``strata`` (e.g. the class labels) this is done per stratum, so every fold gets its
    share of each class; a group belongs to the stratum of its first item.
    """
    if n_folds < 2:
        raise ValueError("n_folds must be at least 2")
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1}")
    buckets: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        buckets[("__single__", i) if g is None else g].append(i)
    keys = sorted(buckets, key=str)
    random.Random(seed).shuffle(keys)
    keys.sort(key=lambda k: -len(buckets[k]))
    sizes: dict[Hashable, list[int]] = defaultdict(lambda: [0] * n_folds)
    val_set: set[int] = set()
    for k in keys:
        fold_sizes = sizes[None if strata is None else strata[buckets[k][0]]]
        target = min(range(n_folds), key=lambda f: (fold_sizes[f], f))
        fold_sizes[target] += len(buckets[k])
        if target == fold:
            val_set.update(buckets[k])
    train = [it for i, it in enumerate(items) if i not in val_set]
    val = [it for i, it in enumerate(items) if i in val_set]
    return train, val
