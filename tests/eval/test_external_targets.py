"""A dataset's labels expressed in a model's labels, for evaluating a run on other data (``--map``)."""

import numpy as np
import pytest
from data.helpers import save_gray

from cxrkit.data.csv import load_csv
from cxrkit.errors import CxrError
from cxrkit.eval.evaluate import mapped_targets

ROWS = {"0.png": "1,0,0,0", "1.png": "0,0,1,0", "2.png": "0,0,0,0", "3.png": ",0,0,1", "4.png": "0,1,0,0",
        "5.png": "0,,0,0"}


@pytest.fixture
def findings(tmp_path):
    for i, name in enumerate(ROWS):
        save_gray(tmp_path / name, (8, 8), i)
    (tmp_path / "f.csv").write_text("path,Effusion,Edema,Hernia,Pneumonia\n"
                                    + "".join(f"{name},{row}\n" for name, row in ROWS.items()))
    return load_csv(tmp_path / "f.csv")


def test_multilabel_labels_mapped_onto_one_are_combined_and_labels_the_model_lacks_are_left_out(findings, capsys):
    """Each mapped label replaced the one before it (Effusion's support came out as Hernia's), and a dataset label
    the model does not have could not be left out, so a run on a subset of labels could not be evaluated."""
    targets = mapped_targets(findings, ["Effusion", "Other", "Atelectasis"], {"Edema": "Other", "hernia": "OTHER"})
    np.testing.assert_array_equal(targets[:, 0], [1, 0, 0, np.nan, 0, 0])
    # positive where either is, negative where both are known negatives, unknown where one is unknown and none is 1
    np.testing.assert_array_equal(targets[:, 1], [0, 1, 0, 0, 1, np.nan])
    assert np.isnan(targets[:, 2]).all()  # no dataset label means it: unknown, not negative
    assert "note: 1 of the dataset's labels are not the model's and are left out: Pneumonia" in capsys.readouterr().err


def test_no_label_in_common_is_still_an_error(findings):
    with pytest.raises(CxrError, match=r"cannot map dataset labels \['Effusion', 'Edema', 'Hernia', 'Pneumonia'\]"):
        mapped_targets(findings, ["NORMAL", "PNEUMONIA_X"], None)


def test_an_image_with_no_label_decided_has_an_empty_cell_as_its_truth_does(tiny_multilabel_run, tmp_path):
    """predictions.csv wrote a truth with no label as "" and a decision with none as "none", which a label could be
    called; and its probabilities were rounded to 6 decimals, so metrics.json could not be recomputed from it."""
    import csv

    from sklearn.metrics import roc_auc_score
    from synth import with_logits

    from cxrkit.eval.evaluate import evaluate_run

    run = with_logits(tiny_multilabel_run, tmp_path / "run", {}, others=-3.0)  # every label well under 0.5
    metrics, folder = evaluate_run(str(run))
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    assert {row["predicted"] for row in rows} == {""}
    assert "" in {row["true"] for row in rows}  # the synthetic set's "No Finding" rows
    truth = np.array([[label in row["true"].split("|") for label in metrics["labels"]] for row in rows])
    effusion = metrics["labels"].index("Effusion")
    scores = [float(row["p_Effusion"]) for row in rows]
    assert roc_auc_score(truth[:, effusion], scores) == metrics["auc_per_label"]["Effusion"]
