"""Leaderboard scores from a run's files: the val numbers are those of the evaluated checkpoint's epoch. No training."""

from __future__ import annotations

import pytest

from cxrkit.compare.leaderboard import checkpoint_epoch, sort_rows, training_scores
from cxrkit.compare.render import columns_for
from cxrkit.runs import Run


def _multilabel_rows() -> list[dict[str, str]]:
    """metrics.csv of a multi-label run: element-wise val accuracy peaks at epoch 1 (the negatives), val AUC at 3."""
    scores = [(0.86, 0.48), (0.85, 0.61), (0.84, 0.74), (0.85, 0.70)]
    return [{"epoch": str(epoch), "train_loss": str(0.7 / epoch), "val_accuracy": str(accuracy),
             "val_auc": str(auc), "train_seconds": "10", "val_seconds": "2"}
            for epoch, (accuracy, auc) in enumerate(scores, start=1)]


def test_val_scores_are_those_of_the_checkpoint_epoch():
    scores = training_scores(_multilabel_rows(), epoch=3)  # best.pt chosen by val_auc
    assert scores["checkpoint_epoch"] == 3
    assert scores["checkpoint_val_auc"] == 0.74 and scores["checkpoint_val_accuracy"] == 0.84  # not 0.86, epoch 1's
    assert scores["first_epoch_val_accuracy"] == 0.86 and scores["training_seconds"] == 48.0


def test_no_checkpoint_epoch_means_no_checkpoint_scores():
    for epoch in (None, 9):  # no checkpoint; an epoch metrics.csv does not have
        scores = training_scores(_multilabel_rows(), epoch=epoch)
        assert scores["checkpoint_epoch"] is scores["checkpoint_val_auc"] is scores["checkpoint_val_accuracy"] is None


def test_a_run_without_val_auc_has_none():
    rows = [{k: v for k, v in row.items() if k != "val_auc"} for row in _multilabel_rows()]
    assert training_scores(rows, epoch=2)["checkpoint_val_auc"] is None


def test_checkpoint_epoch_is_read_from_the_checkpoint(tmp_path):
    run = Run(tmp_path / "run")
    assert checkpoint_epoch(run, "best") is None
    run.save_checkpoint("best", {"model": {}, "epoch": 3, "monitor": "val_auc", "score": 0.74})
    assert checkpoint_epoch(run, "best") == 3


def _rows() -> list[dict]:
    return [{"cell": f"c{epoch}", "status": "done", "backbone": "densenet121", "weights": "imagenet",
             **training_scores(_multilabel_rows(), epoch=epoch)} for epoch in (1, 3, 2)]


def test_val_auc_is_a_column_and_a_sort_key():
    rows = _rows()
    columns = {c.header: c for c in columns_for(rows, [], "test", "best")}
    assert columns["val AUC at best.pt"].text(rows[1]) == "0.7400"
    assert columns["val acc at best.pt"].text(rows[1]) == "0.8400"
    assert columns["best.pt epoch"].text(rows[1]) == "3"
    assert [r["cell"] for r in sort_rows(rows, "checkpoint_val_auc")] == ["c3", "c2", "c1"]


def test_no_val_auc_recorded_no_val_auc_column():
    rows = [{**row, "checkpoint_val_auc": None} for row in _rows()]
    headers = [c.header for c in columns_for(rows, [], "test", "last")]
    assert "val acc at last.pt" in headers and not any("AUC at" in h for h in headers)


@pytest.mark.parametrize("key", ["checkpoint_val_auc", "checkpoint_val_accuracy"])
def test_sort_keys_are_accepted(key):
    from cxrkit.compare.spec import comparison_from_dict

    assert comparison_from_dict({"name": "x", "sort": key}).sort == key
