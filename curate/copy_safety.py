"""Refusal of copy-dedup results that would wipe a dataset: a chaining threshold merges distinct
images into one huge component or removes most of the pool; such a result raises, naming the
figures and the settings that would allow it, so nothing is committed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

MAX_COMPONENT_SHARE = 0.01  # refuse when the largest component holds more of the pool than this
MIN_COMPONENT_LIMIT = 16  # ... and more records than this (small pools have legitimate groups)
MAX_REMOVED_SHARE = 0.30  # refuse when copy dedup would drop more of the pool than this


class LargeComponentWarning(UserWarning):
    """The largest duplicate component is larger than max_component (a threshold that chains)."""


class CopyDedupRefused(RuntimeError):
    """Copy dedup would wipe too much of the pool (a chaining threshold); stats hold the figures."""

    def __init__(self, message: str, stats: dict) -> None:
        super().__init__(message)
        self.stats = stats


@dataclass(frozen=True)
class SafetyLimits:
    """When copy dedup refuses: largest component > max(share * n, min_component), or removed > share."""

    max_component_share: float = MAX_COMPONENT_SHARE
    min_component: int = MIN_COMPONENT_LIMIT
    max_removed_share: float = MAX_REMOVED_SHARE


def check_safety(stats: dict, limits: SafetyLimits | None = None) -> None:
    """Raise CopyDedupRefused (one line naming the figures and the settings that allow them) when a
    result's largest component or removed share passes the limits; return quietly otherwise."""
    lim = limits or SafetyLimits()
    n, largest, dropped = stats["n"], stats["largest_component"], stats["dropped"]
    problems, allow = [], []
    if largest > max(lim.max_component_share * n, lim.min_component):
        problems.append(f"largest component {largest:,} of {n:,} records ({largest / max(n, 1):.1%} > "
                        f"max_component_share {lim.max_component_share:g})")
        allow.append(f"max_component_share >= {largest / max(n, 1):.3g}")
    if dropped > lim.max_removed_share * n:
        problems.append(f"{dropped:,} of {n:,} records removed ({dropped / max(n, 1):.1%} > "
                        f"max_removed_share {lim.max_removed_share:g})")
        allow.append(f"max_removed_share >= {dropped / max(n, 1):.3g}")
    if problems:
        raise CopyDedupRefused(
            f"copy dedup refused ({stats.get('decision') or 'cosine > ' + str(stats.get('threshold'))}): "
            f"{'; '.join(problems)}; a low threshold chains distinct images: raise it (or verify pairs "
            f"locally), or allow this with "
            f"{' and '.join(allow)}", stats)


def graph_stats(n: int, valid: int | None, pairs: int, sizes: dict[int, int], k: int, threshold: float,
                decision: str | None, index_kind: str, max_component: int,
                limits: SafetyLimits | None) -> tuple[dict, str | None]:
    """A copy graph's stats from its counts (`sizes`: records per group -> groups of that size), the
    warning past max_component (also raised as LargeComponentWarning), and CopyDedupRefused past
    `limits` (None allows any result)."""
    in_groups = sum(s * c for s, c in sizes.items())
    largest = max(sizes) if sizes else int(n > 0)
    dropped = in_groups - sum(sizes.values())
    valid = n if valid is None else int(valid)
    stats = {
        "n": n, "valid": valid, "invalid": n - valid, "pairs": int(pairs),
        "groups": int(sum(sizes.values())), "in_groups": int(in_groups), "dropped": int(dropped),
        "kept": n - dropped, "largest_component": int(largest), "k": k, "threshold": threshold,
        "decision": decision or f"cosine > {threshold}", "index_kind": index_kind,
        "component_sizes": {int(s): int(sizes[s]) for s in sorted(sizes)},
    }
    warning = None
    if largest > max_component:
        warning = (f"largest duplicate component has {largest} records (> max_component={max_component}): "
                   f"threshold {threshold} probably chains distinct images; calibrate it (curate.calibrate)")
        warnings.warn(warning, LargeComponentWarning, stacklevel=3)
    if limits is not None:
        check_safety(stats, limits)
    return stats, warning
