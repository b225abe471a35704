"""Metrics: hand-computed values per class and level, hierarchy measures, input checks, plots, loss weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support
from sklearn.utils.class_weight import compute_class_weight

from medhier.classify.metrics import (
    PLOT_FILES,
    balanced_class_weights,
    evaluate,
    hierarchical_predictions,
    subclass_weights,
    summary_table,
    write_plots,
)
from medhier.classify.taxonomy import Taxonomy

TAX = Taxonomy.from_dict({"normal": ["normal"], "fracture": ["compression", "burst"], "lesion": ["benign", "malignant"]})
# Leaves: 0 normal/normal, 1 fracture/compression, 2 fracture/burst, 3 lesion/benign, 4 lesion/malignant.


def leaf_probs(p_main, p_frac, p_les):
    """(N, 3) P(main), (N, 2) P(sub | fracture), (N, 2) P(sub | lesion) -> (N, 5) P(leaf)."""
    p_main, p_frac, p_les = (np.asarray(a, dtype=float) for a in (p_main, p_frac, p_les))
    return np.column_stack([p_main[:, 0], p_main[:, [1]] * p_frac, p_main[:, [2]] * p_les])


def random_probs(rng, n, taxonomy=TAX, alpha=0.3):
    """Random (p_main, p_leaf) with p_leaf = P(main) x P(sub | main); small alpha gives near-zero entries."""
    p_main = rng.dirichlet(np.full(taxonomy.num_mains, alpha), n)
    p_leaf = np.zeros((n, taxonomy.num_leaves))
    for m in range(taxonomy.num_mains):
        leaves = taxonomy.leaf_mask[m]
        p_leaf[:, leaves] = p_main[:, [m]] * rng.dirichlet(np.full(leaves.sum(), alpha), n)
    return p_main, p_leaf


# -- a 10-sample example, every number below counted by hand ----------------------------------
#
#   i  true leaf             main pred   leaf pred              P(main) n/f/l     P(sub|main) within true main
#   0  normal                normal      normal                 .8 .1 .1          -
#   1  normal                normal      normal                 .6 .3 .1          -
#   2  normal                fracture    fracture/burst         .4 .5 .1          -
#   3  fracture/compression  fracture    fracture/compression   .1 .8 .1          .9/.1  right
#   4  fracture/compression  fracture    fracture/burst         .2 .7 .1          .2/.8  wrong
#   5  fracture/burst        fracture    fracture/burst         .1 .6 .3          .3/.7  right
#   6  fracture/burst        fracture    fracture/burst         .1 .5 .4          .4/.6  right
#   7  lesion/benign         lesion      lesion/benign          .1 .2 .7          .8/.2  right
#   8  lesion/malignant      lesion      lesion/benign          .2 .2 .6          .7/.3  wrong
#   9  lesion/malignant      normal      normal                 .5 .1 .4          .25/.75 right (main wrong)

HAND_MAIN_TRUE = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
HAND_LEAF_TRUE = [0, 0, 0, 1, 1, 2, 2, 3, 4, 4]
HAND_MAIN_PRED = [0, 0, 1, 1, 1, 1, 1, 2, 2, 0]
HAND_LEAF_PRED = [0, 0, 2, 1, 2, 2, 2, 3, 3, 0]
HAND_P_MAIN = [
    [0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1],
    [0.1, 0.6, 0.3], [0.1, 0.5, 0.4], [0.1, 0.2, 0.7], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4],
]
HAND_P_FRAC = [[0.6, 0.4], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]]
HAND_P_LES = [[0.6, 0.4]] * 7 + [[0.8, 0.2], [0.7, 0.3], [0.25, 0.75]]
HAND_ARGS = (
    TAX,
    np.array(HAND_MAIN_TRUE),
    np.array(HAND_LEAF_TRUE),
    np.array(HAND_P_MAIN),
    leaf_probs(HAND_P_MAIN, HAND_P_FRAC, HAND_P_LES),
)


@pytest.fixture(scope="module")
def hand():
    return evaluate(*HAND_ARGS, np.array(HAND_MAIN_PRED), np.array(HAND_LEAF_PRED))


# Main level, one-vs-rest counts:
#   normal:   TP 2 (0,1)  FN 1 (2)  FP 1 (9)  TN 6
#   fracture: TP 4 (3-6)  FN 0      FP 1 (2)  TN 5
#   lesion:   TP 2 (7,8)  FN 1 (9)  FP 0      TN 7
# AUC = share of (positive, negative) pairs ranked right, ties count 1/2:
#   normal   positives .8 .6 .4 beat 7 + 7 + 6 of the 7 negatives (only .5 beats .4)   -> 20/21
#   fracture positives .8 .7 .6 .5 beat 6 + 6 + 6 + 5.5 of 6 (.5 ties .5)              -> 23.5/24
#   lesion   positives .7 .6 .4 beat 7 + 7 + 6.5 of 7 (.4 ties .4)                      -> 20.5/21
MAIN_CASES = [
    # class, sensitivity, specificity, precision, f1, roc_auc, support
    ("normal", 2 / 3, 6 / 7, 2 / 3, 2 / 3, 20 / 21, 3),
    ("fracture", 1.0, 5 / 6, 4 / 5, 8 / 9, 23.5 / 24, 4),
    ("lesion", 2 / 3, 1.0, 1.0, 4 / 5, 20.5 / 21, 3),
]

# Leaf level: confusion rows (true) normal [2,0,1,0,0], compression [0,1,1,0,0], burst [0,0,2,0,0],
# benign [0,0,0,1,0], malignant [1,0,0,1,0]. Malignant is never predicted: precision 0, not a crash.
LEAF_CASES = [
    # class, sensitivity, specificity, precision, f1
    ("normal/normal", 2 / 3, 6 / 7, 2 / 3, 2 / 3),  # FP 1 (9) of 7 negatives
    ("fracture/compression", 1 / 2, 1.0, 1.0, 2 / 3),
    ("fracture/burst", 1.0, 6 / 8, 2 / 4, 2 / 3),  # FP 2 (2, 4) of 8 negatives
    ("lesion/benign", 1.0, 8 / 9, 1 / 2, 2 / 3),  # FP 1 (8) of 9 negatives
    ("lesion/malignant", 0.0, 1.0, 0.0, 0.0),
]


@pytest.mark.parametrize("name,sens,spec,prec,f1,auc,support", MAIN_CASES)
def test_hand_computed_main_class_metrics(hand, name, sens, spec, prec, f1, auc, support):
    got = hand["main"]["per_class"][name]
    assert got == pytest.approx(
        {"sensitivity": sens, "specificity": spec, "precision": prec, "f1": f1, "roc_auc": auc, "support": support}
    )


@pytest.mark.parametrize("name,sens,spec,prec,f1", LEAF_CASES)
def test_hand_computed_leaf_metrics(hand, name, sens, spec, prec, f1):
    got = hand["leaf"]["per_class"][name]
    assert (got["sensitivity"], got["specificity"], got["precision"], got["f1"]) == pytest.approx((sens, spec, prec, f1))


def test_hand_computed_levels_and_hierarchy(hand):
    assert hand["n"] == 10
    assert hand["main"]["accuracy"] == pytest.approx(8 / 10)
    assert hand["leaf"]["accuracy"] == pytest.approx(6 / 10)
    assert hand["main"]["confusion_matrix"] == [[2, 1, 0], [0, 4, 0], [1, 0, 2]]
    assert hand["leaf"]["confusion_matrix"] == [
        [2, 0, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 2, 0, 0],
        [0, 0, 0, 1, 0],
        [1, 0, 0, 1, 0],
    ]
    assert hand["main"]["classes"] == list(TAX.mains) and hand["leaf"]["classes"] == list(TAX.leaf_names)
    assert hand["main"]["macro"] == pytest.approx(
        {
            "sensitivity": (2 / 3 + 1 + 2 / 3) / 3,
            "specificity": (6 / 7 + 5 / 6 + 1) / 3,
            "precision": (2 / 3 + 4 / 5 + 1) / 3,
            "f1": (2 / 3 + 8 / 9 + 4 / 5) / 3,
            "roc_auc": (20 / 21 + 23.5 / 24 + 20.5 / 21) / 3,
        }
    )
    # Subclass given the true main: samples 3-9 (true main has two subclasses); 4 and 8 are wrong.
    # Sample 9 counts as right there although its path (main) is wrong.
    assert hand["hierarchy"] == pytest.approx(
        {"sub_accuracy_given_main": 5 / 7, "sub_support": 7, "path_accuracy": 6 / 10, "consistency": 1.0}
    )


def test_macro_matches_scikit_learn_macro_average(hand):
    for level, y, yhat, k in (("main", HAND_MAIN_TRUE, HAND_MAIN_PRED, 3), ("leaf", HAND_LEAF_TRUE, HAND_LEAF_PRED, 5)):
        p, r, f, _ = precision_recall_fscore_support(y, yhat, labels=range(k), average="macro", zero_division=0)
        macro = hand[level]["macro"]
        assert (macro["precision"], macro["sensitivity"], macro["f1"]) == pytest.approx((p, r, f))


def test_derived_predictions_are_the_hierarchical_argmax(hand):
    # The table's predictions are exactly what the model's probabilities imply.
    assert evaluate(*HAND_ARGS) == hand
    main_pred, leaf_pred = hierarchical_predictions(*HAND_ARGS[:1], HAND_ARGS[3], HAND_ARGS[4])
    np.testing.assert_array_equal(main_pred, HAND_MAIN_PRED)
    np.testing.assert_array_equal(leaf_pred, HAND_LEAF_PRED)


def test_result_is_strict_json(hand):
    assert json.loads(json.dumps(hand, allow_nan=False)) == hand


# -- perfect predictions ----------------------------------------------------------------------

PERFECT_LEAVES = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 2, 4])


@pytest.mark.parametrize("confidence", [1.0, 0.6], ids=["one-hot", "soft"])
def test_perfect_predictions_score_one_everywhere(confidence):
    n, mains = len(PERFECT_LEAVES), TAX.leaf_main[PERFECT_LEAVES]
    rest = (1 - confidence) / 2
    p_main = np.full((n, 3), rest)
    p_main[np.arange(n), mains] = confidence
    sub = np.where(TAX.leaf_sub[PERFECT_LEAVES] == 0, confidence, 1 - confidence)[:, None]
    p_sub = np.hstack([sub, 1 - sub])
    result = evaluate(TAX, mains, PERFECT_LEAVES, p_main, leaf_probs(p_main, p_sub, p_sub))
    for level in ("main", "leaf"):
        assert result[level]["accuracy"] == 1.0
        assert set(result[level]["macro"].values()) == {1.0}
        for metrics in result[level]["per_class"].values():
            assert {k: v for k, v in metrics.items() if k != "support"} == dict.fromkeys(
                ("sensitivity", "specificity", "precision", "f1", "roc_auc"), 1.0
            )
    assert result["hierarchy"] == {"sub_accuracy_given_main": 1.0, "sub_support": 10, "path_accuracy": 1.0, "consistency": 1.0}
    assert np.trace(result["leaf"]["confusion_matrix"]) == n


# -- undefined ROC AUC ------------------------------------------------------------------------

MISSING_CASES = [
    # leaf labels present, classes whose leaf AUC must be None, main classes whose AUC must be None
    ([0, 0, 1, 2, 4, 4, 1, 2], ["lesion/benign"], []),
    ([0, 0, 3, 4, 3, 4], ["fracture/compression", "fracture/burst"], ["fracture"]),
    # only fractures: "fracture" fills the set, so its complement is absent and it has no AUC either
    ([1, 2, 1, 2], ["normal/normal", "lesion/benign", "lesion/malignant"], list(TAX.mains)),
    ([2], list(TAX.leaf_names), list(TAX.mains)),  # one sample: no class has both positives and negatives
]


@pytest.mark.parametrize("leaves,leaf_none,main_none", MISSING_CASES)
def test_absent_class_has_no_auc_and_macro_averages_the_rest(leaves, leaf_none, main_none):
    leaves = np.array(leaves)
    p_main, p_leaf = random_probs(np.random.default_rng(len(leaves)), len(leaves))
    result = evaluate(TAX, TAX.leaf_main[leaves], leaves, p_main, p_leaf)
    json.dumps(result, allow_nan=False)
    for level, none in (("leaf", leaf_none), ("main", main_none)):
        aucs = {name: m["roc_auc"] for name, m in result[level]["per_class"].items()}
        assert [name for name, auc in aucs.items() if auc is None] == none
        defined = [auc for auc in aucs.values() if auc is not None]
        expected = np.mean(defined) if defined else None
        assert result[level]["macro"]["roc_auc"] == pytest.approx(expected)
        # The other macro averages are still numbers over all classes.
        assert all(isinstance(result[level]["macro"][k], float) for k in ("sensitivity", "specificity", "precision", "f1"))


# -- hierarchy measures -----------------------------------------------------------------------

INCOHERENT_CASES = [
    # (main_pred, leaf_pred) pairs; expected consistency
    ([0, 1, 1, 2], [0, 1, 2, 4], 1.0),
    ([0, 1, 1, 2], [3, 1, 2, 4], 0.75),  # "normal" main with a "lesion/benign" leaf
    ([0, 0, 2, 2], [1, 2, 0, 4], 0.25),
]


@pytest.mark.parametrize("main_pred,leaf_pred,consistency", INCOHERENT_CASES)
def test_consistency_counts_leaves_outside_the_predicted_main(main_pred, leaf_pred, consistency):
    leaves = np.array([0, 1, 2, 4])
    p_main, p_leaf = random_probs(np.random.default_rng(1), 4)
    result = evaluate(TAX, TAX.leaf_main[leaves], leaves, p_main, p_leaf, np.array(main_pred), np.array(leaf_pred))
    assert result["hierarchy"]["consistency"] == consistency


SUB_VS_PATH_CASES = [
    # true leaf, P(main) normal/fracture/lesion, P(sub|fracture), P(sub|lesion), sub_accuracy, path_accuracy
    pytest.param(4, [0.6, 0.1, 0.3], [0.5, 0.5], [0.2, 0.8], 1.0, 0.0, id="main-wrong-sub-right"),
    pytest.param(4, [0.1, 0.1, 0.8], [0.5, 0.5], [0.8, 0.2], 0.0, 0.0, id="main-right-sub-wrong"),
    pytest.param(1, [0.1, 0.8, 0.1], [0.7, 0.3], [0.5, 0.5], 1.0, 1.0, id="both-right"),
    pytest.param(0, [0.1, 0.8, 0.1], [0.7, 0.3], [0.5, 0.5], None, 0.0, id="single-subclass-main-not-counted"),
]


@pytest.mark.parametrize("leaf,p_main,p_frac,p_les,sub_accuracy,path_accuracy", SUB_VS_PATH_CASES)
def test_sub_accuracy_judges_the_subclass_inside_the_true_main(leaf, p_main, p_frac, p_les, sub_accuracy, path_accuracy):
    result = evaluate(TAX, TAX.leaf_main[[leaf]], np.array([leaf]), np.array([p_main]), leaf_probs([p_main], [p_frac], [p_les]))
    assert result["hierarchy"]["sub_accuracy_given_main"] == sub_accuracy
    assert result["hierarchy"]["path_accuracy"] == path_accuracy


def test_hierarchical_leaf_can_differ_from_the_flat_argmax():
    # Fracture is the likeliest main (0.40) but splits evenly, so lesion/benign (0.35) is the single
    # likeliest leaf. The report must still say a fracture, never "lesion" under a "fracture" main.
    p_main = np.array([[0.25, 0.40, 0.35]])
    p_leaf = leaf_probs(p_main, [[0.5, 0.5]], [[1.0, 0.0]])
    assert p_leaf.argmax() == 3
    main_pred, leaf_pred = hierarchical_predictions(TAX, p_main, p_leaf)
    assert (main_pred[0], leaf_pred[0]) == (1, 1)


@pytest.mark.parametrize("seed", range(5))
def test_derived_predictions_never_leave_the_predicted_main(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(1, 60))
        p_main, p_leaf = random_probs(rng, n, alpha=float(rng.choice([0.05, 0.5, 5.0])))
        if rng.random() < 0.3:  # a main with zero mass must still yield one of its own leaves
            p_leaf[:, TAX.leaf_mask[1]] = 0.0
            p_main[:, 1] = 0.0
            p_main /= p_main.sum(1, keepdims=True)
            p_leaf /= p_leaf.sum(1, keepdims=True)
        main_pred, leaf_pred = hierarchical_predictions(TAX, p_main, p_leaf)
        np.testing.assert_array_equal(TAX.leaf_main[leaf_pred], main_pred)
        # ... and it is the best leaf of that main.
        np.testing.assert_array_equal(p_leaf[np.arange(n), leaf_pred], np.max(np.where(TAX.leaf_mask[main_pred], p_leaf, -1), axis=1))
        leaves = rng.integers(0, TAX.num_leaves, n)
        assert evaluate(TAX, TAX.leaf_main[leaves], leaves, p_main, p_leaf)["hierarchy"]["consistency"] == 1.0


# -- input checks -----------------------------------------------------------------------------


def _replace(**changes):
    names = ("main_true", "leaf_true", "p_main", "p_leaf")
    args = dict(zip(names, (np.array(a, copy=True) for a in HAND_ARGS[1:])))
    for key, change in changes.items():
        args[key] = change(args.get(key))
    return args


def _p_main_off():
    p = np.array(HAND_P_MAIN)
    p[4] = [0.2, 0.6, 0.1]
    return p


INVALID_CASES = [
    (dict(main_true=lambda a: a[:0]), r"main_true: need at least one sample"),
    (dict(main_true=lambda a: a[:, None]), r"main_true: expected a 1-D array"),
    (dict(main_true=lambda a: a.astype(float)), r"main_true: expected integer class indices"),
    (dict(main_true=lambda a: np.where(a == 2, 3, a)), r"main_true: class indices must lie in \[0, 3\); found \[3\]"),
    (dict(leaf_true=lambda a: a[:-1]), r"leaf_true: expected 10 entries"),
    (dict(leaf_true=lambda a: np.where(a == 4, -1, a)), r"leaf_true: class indices must lie in \[0, 5\)"),
    (dict(leaf_true=lambda a: np.where(a == 0, 1, a)), r"leaf_true: sample 0 has leaf 'fracture/compression' but main_true 'normal'"),
    (dict(p_main=lambda p: p[:, :2]), r"p_main: expected shape \(N, num_mains\) = \(10, 3\), got \(10, 2\)"),
    (dict(p_leaf=lambda p: p.T), r"p_leaf: expected shape \(N, num_leaves\) = \(10, 5\)"),
    (dict(p_main=lambda p: np.where(p == 0.8, np.nan, p)), r"p_main: row 0 holds NaN"),
    (dict(p_main=lambda p: p - 0.15), r"p_main: probabilities must be non-negative"),
    (dict(p_main=lambda p: _p_main_off()), r"p_main: each row must sum to 1 .* row 4 sums to 0.9"),
    (dict(p_leaf=lambda p: p * 1.01), r"p_leaf: each row must sum to 1"),
    (dict(p_leaf=lambda p: p[:, [0, 3, 4, 1, 2]]), r"p_leaf: must be P\(main\) x P\(sub \| main\)"),
]


@pytest.mark.parametrize("changes,message", INVALID_CASES)
def test_invalid_inputs_name_the_argument(changes, message):
    with pytest.raises(ValueError, match=message):
        evaluate(TAX, **_replace(**changes))


@pytest.mark.parametrize(
    "preds,message",
    [
        (dict(main_pred=np.array(HAND_MAIN_PRED[:-1])), r"main_pred: expected 10 entries"),
        (dict(leaf_pred=np.array(HAND_LEAF_PRED) + 2), r"leaf_pred: class indices must lie in \[0, 5\); found \[5\]"),
    ],
)
def test_invalid_predictions_name_the_argument(preds, message):
    with pytest.raises(ValueError, match=message):
        evaluate(*HAND_ARGS, **preds)


def test_rows_summing_to_one_within_tolerance_are_accepted():
    p_main = np.array(HAND_P_MAIN, dtype=np.float32) * (1 + 5e-4)  # float32, slightly off: inside 1e-3
    p_leaf = leaf_probs(p_main, HAND_P_FRAC, HAND_P_LES)
    assert evaluate(TAX, *HAND_ARGS[1:3], p_main, p_leaf)["main"]["accuracy"] == pytest.approx(0.8)


# -- plots ------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(HAND_ARGS, id="hand-example"),
        pytest.param((TAX, TAX.leaf_main[[0, 3, 3, 4]], np.array([0, 3, 3, 4]), *random_probs(np.random.default_rng(3), 4)), id="absent-classes"),
    ],
)
def test_plots_are_written_as_real_pngs_and_figures_closed(tmp_path, case):
    out_dir = tmp_path / "run" / "plots"  # nested, created on demand
    figures_before = plt.get_fignums()
    paths = write_plots(*case, out_dir=str(out_dir))
    assert [p.rsplit("/", 1)[1] for p in paths] == list(PLOT_FILES)
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == PNG_SIGNATURE
        assert len(data) > 10_000  # axes, labels and annotations, not a blank canvas
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 400 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # drawn content, not one flat colour
    assert plt.get_fignums() == figures_before == []


def test_plots_name_the_arrays_they_take(tmp_path):
    with pytest.raises(TypeError, match="main_true, leaf_true, p_main, p_leaf"):
        write_plots(*HAND_ARGS[:4], out_dir=str(tmp_path))
    assert not (tmp_path / PLOT_FILES[0]).exists()


# -- summary ----------------------------------------------------------------------------------


def test_summary_table_shows_accuracy_macro_and_hierarchy(hand):
    text = summary_table(hand)
    rows = {line.split()[0]: line.split()[2:] for line in text.splitlines() if line.startswith(("main", "leaf"))}
    # accuracy, macro sensitivity, specificity, F1, AUC
    assert rows["main"] == ["0.800", "0.778", "0.897", "0.785", "0.969"]
    assert rows["leaf"][:2] == ["0.600", "0.633"]
    assert "path accuracy 0.600" in text and "given true main 0.714 (n=7)" in text and "consistency 1.000" in text
    assert "n = 10 samples" in text


def test_summary_table_marks_undefined_values():
    leaves = np.array([2])
    result = evaluate(TAX, TAX.leaf_main[leaves], leaves, *random_probs(np.random.default_rng(0), 1))
    main_row = next(line for line in summary_table(result).splitlines() if line.startswith("main"))
    assert main_row.split()[-1] == "n/a"


# -- loss weights -----------------------------------------------------------------------------

WEIGHT_CASES = [
    # labels, n_classes, expected weights (hand-computed: n / (present * count), absent -> 1)
    ([0, 0, 0, 1], 3, [4 / (2 * 3), 4 / (2 * 1), 1.0]),
    ([0, 1, 2, 0, 1, 2], 3, [1.0, 1.0, 1.0]),
    ([2, 2, 2, 2, 2], 4, [1.0, 1.0, 1.0, 1.0]),
    ([1, 3, 3, 3, 3, 3, 3, 3], 5, [1.0, 8 / (2 * 1), 1.0, 8 / (2 * 7), 1.0]),
    ([], 2, [1.0, 1.0]),
]


@pytest.mark.parametrize("labels,n_classes,expected", WEIGHT_CASES)
def test_balanced_class_weights(labels, n_classes, expected):
    labels = np.array(labels, dtype=np.int64)
    weights = balanced_class_weights(labels, n_classes)
    assert weights.dtype == np.float32 and weights.shape == (n_classes,)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    present = np.unique(labels)
    if present.size:
        np.testing.assert_allclose(weights[present], compute_class_weight("balanced", classes=present, y=labels), rtol=1e-6)


def test_balanced_class_weights_match_scikit_learn_on_random_labels():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_classes = int(rng.integers(2, 8))
        labels = rng.choice(n_classes, size=int(rng.integers(1, 200)), p=rng.dirichlet(np.ones(n_classes)))
        present = np.unique(labels)
        weights = balanced_class_weights(labels, n_classes)
        np.testing.assert_allclose(weights[present], compute_class_weight("balanced", classes=present, y=labels), rtol=1e-6)
        np.testing.assert_array_equal(np.delete(weights, present), 1.0)


def test_subclass_weights_balance_within_each_main():
    # normal x2, compression x3, burst x1, benign x4, malignant x1
    leaves = np.array([0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 4])
    weights = subclass_weights(TAX, leaves)
    assert weights.dtype == np.float32 and weights.shape == (5,)
    np.testing.assert_allclose(weights, [1.0, 4 / (2 * 3), 4 / (2 * 1), 5 / (2 * 4), 5 / (2 * 1)], rtol=1e-6)
    for m in (1, 2):
        subs = TAX.leaf_sub[leaves[TAX.leaf_main[leaves] == m]]
        np.testing.assert_allclose(weights[TAX.leaf_mask[m]], compute_class_weight("balanced", classes=np.unique(subs), y=subs), rtol=1e-6)


def test_subclass_weights_default_to_one_without_samples():
    np.testing.assert_array_equal(subclass_weights(TAX, np.array([0, 0, 1])), [1.0, 1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: balanced_class_weights(np.array([0, 3]), 3), r"labels: class indices must lie in \[0, 3\)"),
        (lambda: balanced_class_weights(np.array([0.0, 1.0]), 2), r"labels: expected integer"),
        (lambda: balanced_class_weights(np.array([0]), 0), r"n_classes: expected a positive integer"),
        (lambda: subclass_weights(TAX, np.array([5])), r"leaf_labels: class indices must lie in \[0, 5\)"),
    ],
)
def test_weight_inputs_are_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_module_imports_neither_torch_nor_ray():
    # Reports must be recomputable from saved arrays on a machine without the training stack.
    code = "import sys, medhier.classify.metrics; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]"
