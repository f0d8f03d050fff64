"""Evaluation metrics, accumulated over a whole split (never averaged per batch).

Averaging per-batch scores weights a batch of 2 shapes like a batch of 16 and an S3DIS crop
full of floor like one full of clutter; every accumulator here keeps raw counts (or per-shape
IoUs) and divides once, in `compute()`. `merge(other)` adds another accumulator's state, so DDP
ranks can `all_gather_object` their accumulators and merge them on rank 0.

Inputs may live on any device; `update` reduces logits to predictions where they are and keeps
its state on the CPU. All results are fractions in [0, 1].
"""
import math

import torch


def _as_prediction(pred, label):
    """Logits (..., K) -> argmax over K; integer predictions (...) pass through. Both flattened."""
    if pred.is_floating_point() and pred.dim() == label.dim() + 1:
        pred = pred.argmax(dim=-1)
    if pred.shape != label.shape:
        raise ValueError(f"metrics: prediction shape {tuple(pred.shape)} does not match "
                         f"label shape {tuple(label.shape)}")
    return pred.reshape(-1).long().cpu(), label.reshape(-1).long().cpu()


class PartSegMetric:
    """Part segmentation (ShapeNet part protocol): per-shape IoU over the shape's own category.

    part_ranges[c] = (start, stop), the half-open global part ids of category c.
    """

    def __init__(self, part_ranges, category_names):
        if len(part_ranges) != len(category_names):
            raise ValueError(f"metrics: {len(part_ranges)} part ranges for "
                             f"{len(category_names)} categories")
        self.part_ranges = [tuple(int(v) for v in r) for r in part_ranges]
        self.category_names = list(category_names)
        self.num_parts = max(stop for _, stop in self.part_ranges)
        self.shape_ious = []        # one float per evaluated shape
        self.shape_categories = []  # its category index
        self.correct = 0            # points whose (category-restricted) prediction is right
        self.total = 0

    def update(self, logits, labels, category):
        """logits (B, N, P), labels (B, N) global part ids, category (B,)."""
        self.update_predictions(self.predict(logits, category), labels, category)

    def predict(self, logits, category):
        """The predicted global part ids (B, N), each shape's argmax over its own category's
        parts (the category is known at test time), on the logits' device without waiting for
        it: evaluation on a GPU keeps these there and scores them after its loop."""
        if logits.dim() != 3 or logits.shape[-1] != self.num_parts:
            raise ValueError(f"metrics: part logits must be (B, N, {self.num_parts}), "
                             f"got {tuple(logits.shape)}")
        if category.shape != logits.shape[:1]:
            raise ValueError(f"metrics: category {tuple(category.shape)} does not match "
                             f"logits {tuple(logits.shape)}")
        device = logits.device
        ranges = torch.tensor(self.part_ranges, device=device)  # (C, 2)
        # clamped only to index safely; update_predictions rejects categories out of range
        category = category.long().to(device).clamp(0, len(self.part_ranges) - 1)
        start, stop = ranges[category, 0], ranges[category, 1]  # (B,)
        part_ids = torch.arange(self.num_parts, device=device)
        in_category = (part_ids >= start[:, None]) & (part_ids < stop[:, None])  # (B, P)
        return logits.detach().masked_fill(~in_category[:, None, :], float("-inf")).argmax(-1)

    def update_predictions(self, pred, labels, category):
        """pred (B, N) from `predict`, labels (B, N) global part ids, category (B,)."""
        if labels.shape != pred.shape or category.shape != pred.shape[:1]:
            raise ValueError(f"metrics: labels {tuple(labels.shape)} / category "
                             f"{tuple(category.shape)} do not match predictions "
                             f"{tuple(pred.shape)}")
        pred, labels, category = pred.cpu(), labels.long().cpu(), category.long().cpu()  # (B, N)
        if category.min() < 0 or category.max() >= len(self.part_ranges):
            raise ValueError(f"metrics: a category lies outside 0..{len(self.part_ranges) - 1}")
        ranges = torch.tensor(self.part_ranges)
        start, stop = ranges[category, 0], ranges[category, 1]
        if ((labels < start[:, None]) | (labels >= stop[:, None])).any():
            raise ValueError("metrics: a part label lies outside its shape's category range")

        # Per-shape, per-local-part counts via one bincount over (shape, local part) pairs.
        b = labels.shape[0]
        width = int((stop - start).max())                 # most parts of any category here
        offset = (torch.arange(b) * width - start)[:, None]  # global id -> row-major (shape, part)

        def count(ids):
            return torch.bincount(ids.reshape(-1), minlength=b * width).view(b, width)

        hit = pred == labels
        intersection = count((labels + offset)[hit])      # (B, W)
        union = count(pred + offset) + count(labels + offset) - intersection
        # A part absent from both prediction and ground truth counts as IoU 1 (ShapeNet protocol).
        iou = torch.where(union > 0, intersection.double() / union.clamp(min=1),
                          torch.ones((), dtype=torch.float64))
        n_parts = stop - start                            # (B,)
        own_part = torch.arange(width) < n_parts[:, None]  # (B, W): columns past a category's parts
        shape_iou = (iou * own_part).sum(1) / n_parts

        self.shape_ious += shape_iou.tolist()
        self.shape_categories += category.tolist()
        self.correct += int(hit.sum())
        self.total += hit.numel()

    def merge(self, other):
        _check_mergeable(self, other, "category_names")
        self.shape_ious += other.shape_ious
        self.shape_categories += other.shape_categories
        self.correct += other.correct
        self.total += other.total
        return self

    def compute(self):
        if not self.shape_ious:
            raise ValueError("metrics: no shapes were evaluated (empty split?)")
        # fsum is exact before its one rounding, so the means do not depend on the order the
        # shapes arrived in (DDP ranks merge their shards in rank order, not sample order).
        per_category = {}
        for c, name in enumerate(self.category_names):
            in_cat = [iou for iou, cat in zip(self.shape_ious, self.shape_categories) if cat == c]
            per_category[name] = math.fsum(in_cat) / len(in_cat) if in_cat else None
        # A category without shapes has no mean; it is left out of class mIoU, not counted 0.
        present = [v for v in per_category.values() if v is not None]
        return {"accuracy": self.correct / self.total,
                "ins_miou": math.fsum(self.shape_ious) / len(self.shape_ious),
                "cat_miou": sum(present) / len(present),
                "per_category": per_category,
                "num_shapes": len(self.shape_ious)}


class _ConfusionMetric:
    """A K x K confusion matrix (rows: ground truth, columns: prediction) over all samples."""

    def __init__(self, class_names, ignore_index=None):
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        k = len(self.class_names)
        self.confusion = torch.zeros(k, k, dtype=torch.int64)

    def update(self, pred, label):
        """pred: logits (..., K) or integer predictions (...); label: (...) class ids."""
        pred, label = _as_prediction(pred, label)
        if self.ignore_index is not None:
            keep = label != self.ignore_index
            pred, label = pred[keep], label[keep]
        k = len(self.class_names)
        for what, ids in (("label", label), ("prediction", pred)):
            if len(ids) and (ids.min() < 0 or ids.max() >= k):
                raise ValueError(f"metrics: a {what} lies outside 0..{k - 1} "
                                 f"(ignore_index={self.ignore_index})")
        self.confusion += torch.bincount(label * k + pred, minlength=k * k).view(k, k)

    def merge(self, other):
        _check_mergeable(self, other, "class_names")
        self.confusion += other.confusion
        return self

    def _counts(self):
        total = int(self.confusion.sum())
        if total == 0:
            raise ValueError("metrics: nothing was evaluated (empty split?)")
        c = self.confusion.double()
        tp = c.diag()
        recall = tp / c.sum(1)  # NaN for a class absent from the ground truth
        return c, tp, recall, float(tp.sum()) / total

    def _named(self, values):
        return {n: (None if torch.isnan(v) else float(v)) for n, v in zip(self.class_names, values)}


class SemSegMetric(_ConfusionMetric):
    """Semantic segmentation (S3DIS protocol); `ignore_index` labels (e.g. -1, 255) are skipped."""

    def compute(self):
        c, tp, recall, oa = self._counts()
        # IoU_c = TP / (TP + FP + FN). A class absent from both prediction and ground truth has
        # 0/0: it is NaN and left out of mIoU (standard S3DIS practice), not counted 0 or 1.
        iou = tp / (c.sum(0) + c.sum(1) - tp)
        return {"oa": oa,
                "macc": float(recall.nanmean()),  # over classes present in the ground truth
                "miou": float(iou.nanmean()),
                "per_class": self._named(iou),
                "confusion": self.confusion.tolist()}


class ClsMetric(_ConfusionMetric):
    """Shape classification: overall accuracy and mean per-class accuracy."""

    def __init__(self, class_names):
        super().__init__(class_names)

    def compute(self):
        _, _, recall, oa = self._counts()
        return {"oa": oa,
                "macc": float(recall.nanmean()),  # over classes with at least one sample
                "per_class": self._named(recall)}


def _check_mergeable(mine, other, names_attr):
    if type(other) is not type(mine) or getattr(other, names_attr) != getattr(mine, names_attr):
        raise ValueError(f"metrics: cannot merge {type(other).__name__} into "
                         f"{type(mine).__name__} with a different label space")


_METRIC_KEY = {"partseg": "ins_miou", "semseg": "miou", "cls": "oa"}


def metric_key(task):
    """The single number that picks best.pt and is HAQ's reward metric."""
    if task not in _METRIC_KEY:
        raise ValueError(f"metrics: unknown task {task!r}; expected one of {sorted(_METRIC_KEY)}")
    return _METRIC_KEY[task]


def make_metric(dataset):
    """A fresh accumulator for a dataset's task (attributes task, class_names, and for partseg
    category_names and part_ranges; semseg datasets may set ignore_index)."""
    metric_key(dataset.task)
    if dataset.task == "partseg":
        return PartSegMetric(dataset.part_ranges, dataset.category_names)
    if dataset.task == "semseg":
        return SemSegMetric(dataset.class_names, getattr(dataset, "ignore_index", None))
    return ClsMetric(dataset.class_names)
