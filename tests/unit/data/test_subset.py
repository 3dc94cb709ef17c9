from __future__ import annotations

import pytest

from medrag_ray.data.subset import spread_over_domains, take_spread

GROUPED = ["radiology"] * 6 + ["ophthalmology"] * 2 + ["pathology"] * 4
"""A samples file as the synthetic generator writes it: grouped by domain, domains of unequal size."""


def test_rows_are_taken_round_robin_over_the_domains_in_file_order() -> None:
    picked = spread_over_domains(GROUPED, 7)
    # ranks 0 and 1 of each domain (6 rows), then rank 2 in domain-name order: ophthalmology has run out, so pathology
    assert [GROUPED[i] for i in picked].count("radiology") == 2
    assert [GROUPED[i] for i in picked].count("ophthalmology") == 2
    assert [GROUPED[i] for i in picked].count("pathology") == 3
    assert picked == [0, 1, 6, 7, 8, 9, 10]  # each domain's first rows, ascending


def test_a_domain_that_runs_out_leaves_its_share_to_the_others() -> None:
    picked = spread_over_domains(GROUPED, 11)
    assert [GROUPED[i] for i in picked].count("ophthalmology") == 2 and len(picked) == 11


def test_a_larger_limit_selects_a_superset_and_zero_selects_all() -> None:
    for small, large in [(1, 2), (3, 5), (5, 11)]:
        assert set(spread_over_domains(GROUPED, small)) <= set(spread_over_domains(GROUPED, large))
    assert spread_over_domains(GROUPED, 0) == list(range(len(GROUPED)))
    assert spread_over_domains(GROUPED, 100) == list(range(len(GROUPED)))


def test_take_spread_and_bad_input() -> None:
    items = [f"s{i}" for i in range(len(GROUPED))]
    assert take_spread(items, GROUPED, 3) == ["s0", "s6", "s8"]
    with pytest.raises(ValueError, match="limit"):
        spread_over_domains(GROUPED, -1)
    with pytest.raises(ValueError, match="items"):
        take_spread(items[:-1], GROUPED, 3)
