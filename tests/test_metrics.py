"""Metrics on small hand-computed cases; the expected values are worked out in the comments."""
from types import SimpleNamespace

import pytest
import torch

from lib.metrics import (ClsMetric, PartSegMetric, SemSegMetric, make_metric, metric_key)

# Three categories: A owns parts 0-1, B parts 2-4, C parts 5-6 (global ids, half-open ranges).
PART_RANGES = [(0, 2), (2, 5), (5, 7)]
CATEGORIES = ["A", "B", "C"]


def one_hot_logits(pred, num_parts=7):
    """Logits whose argmax is `pred`. pred: (B, N) -> (B, N, P)."""
    return torch.nn.functional.one_hot(torch.as_tensor(pred), num_parts).float()


def part_metric():
    return PartSegMetric(PART_RANGES, CATEGORIES)


# A category-B shape: labels [2, 2, 3, 3], prediction [2, 2, 3, 2].
# part 2: pred {0,1,3}, gt {0,1} -> 2/3; part 3: pred {2}, gt {2,3} -> 1/2;
# part 4: in neither -> counts 1. Shape IoU = (2/3 + 1/2 + 1) / 3 = 13/18; 3 of 4 points right.
B_LABELS, B_PRED, B_IOU = [[2, 2, 3, 3]], [[2, 2, 3, 2]], 13 / 18


def perfect_a_shapes(n):
    """n category-A shapes of 4 points, predicted exactly."""
    labels = torch.tensor([[0, 0, 1, 1]] * n)
    return one_hot_logits(labels), labels, torch.zeros(n, dtype=torch.long)


def feed_b_shape(metric):
    metric.update(one_hot_logits(B_PRED), torch.tensor(B_LABELS), torch.tensor([1]))


def test_part_absent_from_prediction_and_ground_truth_counts_one():
    m = part_metric()
    feed_b_shape(m)
    r = m.compute()
    assert r["ins_miou"] == pytest.approx(B_IOU)  # 13/18; were part 4 counted 0 it'd be 7/18
    assert r["accuracy"] == pytest.approx(3 / 4)
    assert r["num_shapes"] == 1


def test_category_without_shapes_is_excluded_from_class_miou():
    m = part_metric()
    m.update(*perfect_a_shapes(1))
    feed_b_shape(m)
    r = m.compute()
    assert r["per_category"] == {"A": 1.0, "B": pytest.approx(B_IOU), "C": None}
    assert r["cat_miou"] == pytest.approx((1 + B_IOU) / 2)  # not (1 + B_IOU + 0) / 3


def test_argmax_is_restricted_to_the_shapes_category():
    labels = torch.tensor([[2, 3, 4, 4]])
    logits = one_hot_logits(labels)
    logits[..., 0] = 100.0  # category A's part, larger than anything: must not be chosen
    logits[..., 6] = 50.0   # category C's part, likewise (the range is bounded on both sides)
    m = part_metric()
    m.update(logits, labels, torch.tensor([1]))
    r = m.compute()
    assert r["accuracy"] == 1.0 and r["ins_miou"] == 1.0


def test_instance_and_class_miou_differ_when_shape_counts_differ():
    m = part_metric()
    m.update(*perfect_a_shapes(3))
    feed_b_shape(m)
    r = m.compute()
    assert r["ins_miou"] == pytest.approx((3 + B_IOU) / 4)  # 67/72: every shape weighs the same
    assert r["cat_miou"] == pytest.approx((1 + B_IOU) / 2)  # 31/36: every category weighs the same
    assert r["ins_miou"] != pytest.approx(r["cat_miou"])


def test_whole_split_accumulation_differs_from_averaging_per_batch():
    batches = [perfect_a_shapes(3),
               (one_hot_logits(B_PRED), torch.tensor(B_LABELS), torch.tensor([1]))]
    per_batch = []
    for batch in batches:  # the mistake: a fresh metric per batch, then average the batch scores
        m = part_metric()
        m.update(*batch)
        per_batch.append(m.compute())
    wrong_ins = sum(r["ins_miou"] for r in per_batch) / 2      # (1 + 13/18) / 2 = 31/36
    wrong_acc = sum(r["accuracy"] for r in per_batch) / 2      # (1 + 3/4) / 2 = 7/8

    m = part_metric()
    for batch in batches:
        m.update(*batch)
    r = m.compute()
    right_ins, right_acc = (3 + B_IOU) / 4, (12 + 3) / 16        # 67/72 and 15/16
    assert r["ins_miou"] == pytest.approx(right_ins) and r["accuracy"] == pytest.approx(right_acc)
    assert wrong_ins != pytest.approx(right_ins) and wrong_acc != pytest.approx(right_acc)


def reference_shape_ious(logits, labels, category):
    """The ShapeNet part protocol written as plain loops, to check the vectorised version."""
    ious = []
    for b in range(len(labels)):
        start, stop = PART_RANGES[int(category[b])]
        pred = logits[b, :, start:stop].argmax(-1) + start
        per_part = []
        for part in range(start, stop):
            p, g = pred == part, labels[b] == part
            union = int((p | g).sum())
            per_part.append(1.0 if union == 0 else int((p & g).sum()) / union)
        ious.append(sum(per_part) / len(per_part))
    return ious


def test_vectorised_shape_iou_matches_loop_reference_on_random_batch():
    g = torch.Generator().manual_seed(0)
    category = torch.randint(0, 3, (12,), generator=g)
    start = torch.tensor([r[0] for r in PART_RANGES])[category]
    size = torch.tensor([r[1] - r[0] for r in PART_RANGES])[category]
    labels = start[:, None] + (torch.rand(12, 9, generator=g) * size[:, None]).long()
    logits = torch.randn(12, 9, 7, generator=g)
    m = part_metric()
    m.update(logits, labels, category)
    assert m.shape_ious == pytest.approx(reference_shape_ious(logits, labels, category))
    assert m.shape_categories == category.tolist()


def test_part_metric_merge_equals_single_accumulator():
    g = torch.Generator().manual_seed(1)
    category = torch.randint(0, 3, (10,), generator=g)
    start = torch.tensor([r[0] for r in PART_RANGES])[category]
    labels = start[:, None] + torch.randint(0, 2, (10, 6), generator=g)
    logits = torch.randn(10, 6, 7, generator=g)
    whole, rank0, rank1 = part_metric(), part_metric(), part_metric()
    whole.update(logits, labels, category)
    rank0.update(logits[:3], labels[:3], category[:3])
    rank1.update(logits[3:], labels[3:], category[3:])
    assert rank0.merge(rank1).compute() == whole.compute()


def test_part_label_outside_its_category_is_an_error():
    with pytest.raises(ValueError, match="outside its shape's category"):
        part_metric().update(one_hot_logits([[0, 5]]), torch.tensor([[0, 5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="must be"):
        part_metric().update(torch.zeros(1, 2, 6), torch.tensor([[0, 1]]), torch.tensor([0]))


# S3DIS-style example, classes a, b, c, d; rows of the confusion matrix are ground truth.
#   labels [0, 0, 0, 1, 1, 2, -1]   predictions [0, 0, 1, 1, 2, 2, 0]   (-1 ignored)
#   confusion [[2,1,0,0], [0,1,1,0], [0,0,1,0], [0,0,0,0]]
#   TP [2,1,1,0], FP [0,1,1,0], FN [1,1,0,0] -> IoU [2/3, 1/3, 1/2, NaN (d absent: skipped)]
#   mIoU = 1/2; recall [2/3, 1/2, 1] -> mAcc = 13/18; OA = 4/6.
SEM_LABELS = torch.tensor([0, 0, 0, 1, 1, 2, -1])
SEM_PRED = torch.tensor([0, 0, 1, 1, 2, 2, 0])


def check_sem_example(r):
    assert r["confusion"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert r["per_class"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3),
                              "c": pytest.approx(1 / 2), "d": None}
    assert r["miou"] == pytest.approx(1 / 2)
    assert r["macc"] == pytest.approx(13 / 18)
    assert r["oa"] == pytest.approx(4 / 6)


def test_semseg_confusion_iou_macc_oa_from_predictions_and_from_logits():
    m = SemSegMetric("abcd", ignore_index=-1)
    m.update(SEM_PRED, SEM_LABELS)
    check_sem_example(m.compute())
    m = SemSegMetric("abcd", ignore_index=-1)
    m.update(one_hot_logits(SEM_PRED[None], 4), SEM_LABELS[None])  # (1, N, K) logits, B = 1
    check_sem_example(m.compute())


def test_semseg_ignore_label_is_excluded_and_otherwise_rejected():
    m = SemSegMetric("abcd", ignore_index=255)
    labels = torch.cat([SEM_LABELS[:-1], torch.tensor([255, 255])])
    m.update(torch.cat([SEM_PRED[:-1], torch.tensor([3, 1])]), labels)  # ignored preds vary
    check_sem_example(m.compute())
    with pytest.raises(ValueError, match="outside"):
        SemSegMetric("abcd").update(SEM_PRED, SEM_LABELS)  # -1 without ignore_index


def test_semseg_class_predicted_but_absent_from_ground_truth():
    # labels [0, 0], predictions [0, 1]: IoU a = 1/2, IoU b = 0/(0+1+0) = 0 (counted in mIoU);
    # b has no ground truth, so its recall is undefined and mAcc is a's recall alone.
    m = SemSegMetric("ab")
    m.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    r = m.compute()
    assert r["miou"] == pytest.approx(0.25) and r["macc"] == pytest.approx(0.5)


def test_semseg_merge_equals_single_accumulator():
    whole, rank0, rank1 = (SemSegMetric("abcd", ignore_index=-1) for _ in range(3))
    whole.update(SEM_PRED, SEM_LABELS)
    rank0.update(SEM_PRED[:2], SEM_LABELS[:2])
    rank1.update(SEM_PRED[2:], SEM_LABELS[2:])
    assert rank0.merge(rank1).compute() == whole.compute()
    with pytest.raises(ValueError, match="label space"):
        rank0.merge(SemSegMetric("abc"))


def test_cls_oa_versus_macc_on_imbalanced_classes():
    # 8 samples of class 0, 2 of class 1, none of class 2; everything predicted 0.
    # OA = 8/10, mAcc = (1 + 0) / 2 (class 2 has no samples: left out, shown as None).
    labels = torch.tensor([0] * 8 + [1] * 2)
    logits = torch.zeros(10, 3)
    logits[:, 0] = 1.0
    m = ClsMetric(["x", "y", "z"])
    m.update(logits, labels)
    r = m.compute()
    assert r["oa"] == pytest.approx(0.8) and r["macc"] == pytest.approx(0.5)
    assert r["per_class"] == {"x": 1.0, "y": 0.0, "z": None}


def test_cls_merge_equals_single_accumulator():
    labels, pred = torch.tensor([0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 0, 2, 1, 2])
    whole, rank0, rank1 = (ClsMetric("xyz") for _ in range(3))
    whole.update(pred, labels)
    rank0.update(pred[:4], labels[:4])
    rank1.update(pred[4:], labels[4:])
    assert rank0.merge(rank1).compute() == whole.compute()


def test_empty_split_is_an_error_not_nan():
    for m in (part_metric(), SemSegMetric("ab"), ClsMetric("ab")):
        with pytest.raises(ValueError, match="evaluated"):
            m.compute()


def test_metric_key_and_make_metric():
    assert [metric_key(t) for t in ("partseg", "semseg", "cls")] == ["ins_miou", "miou", "oa"]
    parts = SimpleNamespace(task="partseg", class_names=list("abcdefg"),
                            category_names=CATEGORIES, part_ranges=PART_RANGES)
    rooms = SimpleNamespace(task="semseg", class_names=["a", "b"], ignore_index=255)
    shapes = SimpleNamespace(task="cls", class_names=["a", "b"])
    assert isinstance(make_metric(parts), PartSegMetric)
    assert make_metric(rooms).ignore_index == 255
    assert type(make_metric(shapes)) is ClsMetric
    with pytest.raises(ValueError, match="unknown task"):
        make_metric(SimpleNamespace(task="detection", class_names=[]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_give_the_same_results():
    logits, labels, category = perfect_a_shapes(2)
    cpu, gpu = part_metric(), part_metric()
    cpu.update(logits, labels, category)
    gpu.update(logits.cuda(), labels.cuda(), category.cuda())
    assert gpu.compute() == cpu.compute()
    sem = SemSegMetric("abcd", ignore_index=-1)
    sem.update(SEM_PRED.cuda(), SEM_LABELS.cuda())
    check_sem_example(sem.compute())
