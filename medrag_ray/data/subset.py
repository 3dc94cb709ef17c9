"""What ``limit`` means in every job: ``limit`` rows spread evenly over the domains, each domain's rows in file order.

Sample files are grouped by domain (the synthetic generator writes radiology, then ophthalmology, then pathology),
so "the first ``limit`` rows" would all be one domain. :func:`spread_over_domains` instead takes the rows round-robin
over the domains -- the first row of each domain, then the second of each, ... -- until ``limit`` are taken; a
domain with fewer rows simply runs out. The selection depends only on the rows' order and domains, so a re-run
selects the same rows (mining's exactly-once ledger relies on it), and a larger ``limit`` selects a superset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def spread_over_domains(domains: Sequence[str], limit: int) -> list[int]:
    """Indices (ascending) of the ``limit`` rows selected from rows whose domains are ``domains``; every index when
    ``limit`` is 0 or at least ``len(domains)``."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0 = all), got {limit}")
    if not limit or limit >= len(domains):
        return list(range(len(domains)))
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, domain in enumerate(domains):
        by_domain[domain].append(i)
    queues = [by_domain[d] for d in sorted(by_domain)]
    chosen: list[int] = []
    rank = 0
    while len(chosen) < limit:
        for queue in queues:
            if rank < len(queue) and len(chosen) < limit:
                chosen.append(queue[rank])
        rank += 1
    return sorted(chosen)


def take_spread(items: Sequence[T], domains: Sequence[str], limit: int) -> list[T]:
    """The items :func:`spread_over_domains` selects (``domains[i]`` is the domain of ``items[i]``), in their order."""
    if len(items) != len(domains):
        raise ValueError(f"{len(items)} items but {len(domains)} domains")
    return [items[i] for i in spread_over_domains(domains, limit)]
