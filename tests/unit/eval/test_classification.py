import numpy as np
import pytest

from medrag_ray.eval.classification import classification_report


def test_hand_computed_report() -> None:
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "a", "a"]
    rep = classification_report(y_true, y_pred, ["a", "b", "c"])
    np.testing.assert_array_equal(rep.confusion, [[2, 1, 0], [1, 1, 0], [1, 0, 0]])
    assert rep.accuracy == pytest.approx(3 / 6)
    assert rep.precision("a") == pytest.approx(2 / 4)
    assert rep.recall("a") == pytest.approx(2 / 3)
    assert rep.precision("b") == pytest.approx(1 / 2)
    assert rep.recall("b") == pytest.approx(1 / 2)
    assert rep.precision("c") == 0.0 and rep.recall("c") == 0.0
    assert rep.f1("a") == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    d = rep.to_dict()
    assert d["per_class"]["a"]["support"] == 3
    assert d["confusion"]["rows_truth_cols_predicted"][2] == [1, 0, 0]
    assert "confusion" in rep.format_table()


def test_unknown_label_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\['z'\] are not in labels"):
        classification_report(["a"], ["z"], ["a", "b"])
    with pytest.raises(ValueError, match="one per example"):
        classification_report(["a"], [], ["a"])
