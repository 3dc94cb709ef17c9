import pytest

from medrag_ray.eval.retrieval import recall_at_k


def test_recall_at_k_hand_computed() -> None:
    ranked = [["d1", "d2", "d3"], ["d3", "d1", "d2"], ["d2", "d3"]]
    relevant = ["d1", "d2", {"d9", "d3"}]
    assert recall_at_k(ranked, relevant, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}


def test_recall_at_k_errors() -> None:
    with pytest.raises(ValueError, match="one per query"):
        recall_at_k([["a"]], [])
    with pytest.raises(ValueError, match="no relevant id"):
        recall_at_k([["a"]], [set()])
    with pytest.raises(ValueError, match="positive"):
        recall_at_k([["a"]], ["a"], ks=(0,))
