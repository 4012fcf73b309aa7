"""Metrics: confusion, Hungarian / majority matching, IoU / mIoU / pAcc, accumulators."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from causeseg.metrics import (
    SupervisedMetrics,
    UnsupervisedMetrics,
    confusion_matrix,
    hungarian_match,
    majority_match,
    mapped_confusion,
    remap_predictions,
    segmentation_scores,
    to_json,
)


def naive_confusion(pred, gt, k, c):
    out = np.zeros((k, c), dtype=np.int64)
    for p, g in zip(np.asarray(pred).ravel(), np.asarray(gt).ravel()):
        if 0 <= g < c and 0 <= p < k:
            out[p, g] += 1
    return out


def test_confusion_matches_naive_loop_with_ignores():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, size=(3, 7, 9))
    gt = rng.integers(-1, 5, size=(3, 7, 9))  # -1 and 4 are out of range for C=4: ignored
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), 5, 4)
    assert conf.dtype == torch.int64 and tuple(conf.shape) == (5, 4)
    np.testing.assert_array_equal(conf.numpy(), naive_confusion(pred, gt, 5, 4))
    # numpy input is accepted and gives the same counts
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 5, 4).numpy(), conf.numpy())
    # every ignored pixel is really absent
    valid = (gt >= 0) & (gt < 4)
    assert int(conf.sum()) == int(valid.sum())


@pytest.mark.parametrize("bad", [-1, 5])
def test_confusion_refuses_predictions_outside_the_clusters(bad):
    """A prediction the confusion cannot hold is an error, never silently dropped from the score."""
    pred = np.zeros((2, 3), dtype=np.int64)
    pred[1, 2] = bad
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        confusion_matrix(pred, np.zeros((2, 3), dtype=np.int64), 5, 4)


def test_confusion_shape_mismatch_names_shapes_and_source():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\).*img_001.png"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), 3, 3,
                         source="img_001.png")
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 3, 3)


# Hand-computed example. Rows = clusters, columns = classes.
H = np.array([[0, 2, 8],   # cluster 0 is mostly class 2
              [5, 1, 0],   # cluster 1 is mostly class 0
              [1, 7, 1]])  # cluster 2 is mostly class 1


def test_hand_computed_scores():
    mapping = hungarian_match(H)
    np.testing.assert_array_equal(mapping, [2, 0, 1])
    # mapped confusion rows = predicted class
    np.testing.assert_array_equal(mapped_confusion(H, mapping), [[5, 1, 0], [1, 7, 1], [0, 2, 8]])
    s = segmentation_scores(H, mapping)
    # class 0: TP 5, FP 1, FN 1; class 1: TP 7, FP 2, FN 3; class 2: TP 8, FP 2, FN 1
    expected_iou = [5 / 7, 7 / 12, 8 / 11]
    np.testing.assert_allclose(s["per_class_iou"], expected_iou)
    assert s["miou"] == pytest.approx(sum(expected_iou) / 3)
    assert s["pacc"] == pytest.approx(20 / 25)
    np.testing.assert_allclose(s["per_class_precision"], [5 / 6, 7 / 9, 8 / 10])
    assert s["mean_precision"] == pytest.approx((5 / 6 + 7 / 9 + 8 / 10) / 3)
    assert s["num_pixels"] == 25
    assert s["mapping"] == [2, 0, 1]
    assert s["confusion"] == [[5, 1, 0], [1, 7, 1], [0, 2, 8]]


def test_nan_class_excluded_from_miou():
    # class 2 never occurs and is never predicted -> IoU NaN, excluded from the mean
    conf = np.array([[4, 1, 0], [2, 3, 0], [0, 0, 0]])
    s = segmentation_scores(conf, None)
    assert math.isnan(s["per_class_iou"][2])
    assert s["per_class_iou"][0] == pytest.approx(4 / 7)  # TP 4, FP 1, FN 2
    assert s["per_class_iou"][1] == pytest.approx(3 / 6)  # TP 3, FP 2, FN 1
    assert s["miou"] == pytest.approx((4 / 7 + 3 / 6) / 2)
    assert s["pacc"] == pytest.approx(7 / 10)
    # a class that occurs but is never predicted has IoU 0 (not NaN) and counts in the mean
    conf2 = np.array([[4, 1, 2], [2, 3, 0], [0, 0, 0]])
    s2 = segmentation_scores(conf2, None)
    assert s2["per_class_iou"][2] == 0.0
    # class 0: TP 4, FP 3, FN 2; class 1: TP 3, FP 2, FN 1
    assert s2["miou"] == pytest.approx((4 / 9 + 3 / 6 + 0) / 3)
    # empty confusion: everything NaN, still JSON-serialisable
    s3 = segmentation_scores(np.zeros((2, 2), dtype=np.int64), None)
    assert math.isnan(s3["miou"]) and math.isnan(s3["pacc"])
    js = json.loads(json.dumps(to_json(s3), allow_nan=False))
    assert js["miou"] is None and js["per_class_iou"] == [None, None]


@pytest.mark.parametrize("c", [1, 2, 3, 4, 5, 6])
def test_hungarian_equals_brute_force(c):
    rng = np.random.default_rng(100 + c)
    for _ in range(5):
        conf = rng.integers(0, 10_000, size=(c, c))
        best_val, best_perm = -1, None
        for perm in itertools.permutations(range(c)):
            val = sum(conf[k, perm[k]] for k in range(c))
            if val > best_val:
                best_val, best_perm = val, perm
        mapping = hungarian_match(conf)
        assert sorted(mapping.tolist()) == list(range(c))  # one-to-one
        assert sum(conf[k, mapping[k]] for k in range(c)) == best_val
        # random values in [0, 1e4): the optimum is unique with overwhelming probability
        np.testing.assert_array_equal(mapping, best_perm)
        # the score of the optimal mapping equals trace of the permuted confusion / total
        assert segmentation_scores(conf, mapping)["pacc"] == pytest.approx(best_val / conf.sum())


def test_hungarian_refuses_overclustering_and_majority_is_many_to_one():
    conf = np.array([[9, 1], [8, 0], [0, 5], [0, 0]])  # 4 clusters, 2 classes
    with pytest.raises(ValueError, match="majority_match"):
        hungarian_match(conf)
    m = majority_match(conf)
    np.testing.assert_array_equal(m, [0, 0, 1, -1])
    s = segmentation_scores(conf, m)
    # class 0: TP 17, FP 1, FN 0; class 1: TP 5, FP 0, FN 1
    np.testing.assert_allclose(s["per_class_iou"], [17 / 18, 5 / 6])
    assert s["pacc"] == pytest.approx(22 / 23)
    with pytest.raises(ValueError, match="majority"):
        UnsupervisedMetrics(2, 4)
    um = UnsupervisedMetrics(2, 4, matching="majority")
    um.confusion = torch.as_tensor(conf)
    assert um.compute()["matching"] == "majority"


def test_unmapped_cluster_counts_as_false_negative():
    conf = np.array([[5, 0, 1], [0, 4, 0]])  # K=2 < C=3
    mapping = hungarian_match(conf)
    np.testing.assert_array_equal(mapping, [0, 1])
    s = segmentation_scores(conf, mapping)
    assert s["per_class_iou"][2] == 0.0  # class 2 has 1 pixel, never predicted
    assert s["per_class_iou"][0] == pytest.approx(5 / 6)


def test_remap_predictions_numpy_and_torch():
    mapping = np.array([2, 0, 1])
    pred = np.array([[0, 1, 2], [3, -1, 0]])
    np.testing.assert_array_equal(remap_predictions(pred, mapping), [[2, 0, 1], [-1, -1, 2]])
    out = remap_predictions(torch.from_numpy(pred), mapping)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), [[2, 0, 1], [-1, -1, 2]])


def test_accumulator_matches_on_whole_dataset_not_per_image():
    # image A: cluster 0 <-> class 0; image B: the clusters are swapped. Per-image matching would
    # give pAcc 1.0; the dataset-level matching must give 0.5.
    gt = torch.tensor([[0, 0, 1, 1]])
    m = UnsupervisedMetrics(2)
    m.update(torch.tensor([[0, 0, 1, 1]]), gt)
    m.update(torch.tensor([[1, 1, 0, 0]]), gt)
    s = m.compute()
    assert s["pacc"] == pytest.approx(0.5)
    assert s["miou"] == pytest.approx(1 / 3)  # each class: TP 2, FP 2, FN 2


def test_accumulator_split_merge_state_dict_reset():
    rng = np.random.default_rng(3)
    preds = [rng.integers(0, 4, size=(2, 5, 6)) for _ in range(4)]
    gts = [rng.integers(-1, 4, size=(2, 5, 6)) for _ in range(4)]
    whole = UnsupervisedMetrics(4)
    whole.update(np.concatenate(preds), np.concatenate(gts))
    a, b = UnsupervisedMetrics(4), UnsupervisedMetrics(4)
    for i in range(4):
        (a if i % 2 else b).update(torch.from_numpy(preds[i]), torch.from_numpy(gts[i]))
    a.merge(b.state_dict())
    torch.testing.assert_close(a.confusion, whole.confusion)
    np.testing.assert_array_equal(a.confusion.numpy(),
                                  naive_confusion(np.concatenate(preds), np.concatenate(gts), 4, 4))
    sa, sw = a.compute(), whole.compute()
    assert sa["miou"] == sw["miou"] and sa["mapping"] == sw["mapping"]
    expected = segmentation_scores(whole.confusion, hungarian_match(whole.confusion))
    assert sw["miou"] == expected["miou"] and sw["pacc"] == expected["pacc"]
    assert sw["cluster_confusion"] == whole.confusion.tolist()
    assert sw["confusion"] == mapped_confusion(whole.confusion, np.array(sw["mapping"])).tolist()
    c = UnsupervisedMetrics(4)
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(c.confusion, a.confusion)
    c.reset()
    assert int(c.confusion.sum()) == 0
    with pytest.raises(ValueError, match="shape"):
        UnsupervisedMetrics(3).merge(a)
    json.dumps(to_json(sw), allow_nan=False)


def test_supervised_metrics_uses_identity():
    m = SupervisedMetrics(2)
    m.update(torch.tensor([1, 1, 0, 0]), torch.tensor([0, 0, 1, -1]))  # all wrong; Hungarian would swap
    s = m.compute()
    assert s["pacc"] == 0.0 and s["mapping"] == [0, 1] and s["matching"] == "identity"
