"""Predictions out of an evaluation: the same pass that computes the metric (lib/train.evaluate)
hands every batch's predictions, or every room's voted full-resolution prediction, to a
PredictionSink when one is given (eval.py --save-pred / --render, the tensorboard figures of
lib/runlog.py); without one, evaluation does none of this work.

A sink can
- write one binary PLY per shape / room (lib/ply.py: x y z, the predicted class's colour,
  integer fields `label` and `pred`), plus predictions.csv (one row per file) and README.txt
  (how to read them) once the split is done;
- keep the first `keep` samples (subsampled to what a figure draws) and turn them into figures
  (lib/render.py), with the per-class chart and the confusion matrix of the whole split.

Label ids in the files are the dataset's: part segmentation uses global part ids (ShapeNet's
0..49), semantic segmentation and classification their class ids.
"""
import csv
import os

import numpy as np

from lib import distributed
from lib.metrics import SemSegMetric
from lib.ply import label_dtype, write_ply
from lib.render import (MAX_DRAWN_POINTS, cls_figure, confusion_figure, palette, per_class_figure,
                        room_figure, save_figure, shape_figure)

README = """Predictions of {ckpt} on the {split} split of {dataset} ({task}).

One binary little-endian PLY (CloudCompare, MeshLab, Open3D open it) per {unit}:
  x y z            float32, {coordinates}
  red green blue   uchar, the colour of the predicted {kind}
  label, pred      {int_type}, ground truth and prediction ({ids}; names in each file's comments)
predictions.csv lists every file with its category (part segmentation), its true and predicted
class (classification; "per point" otherwise) and the fraction of its points predicted right.
Read one back in Python: `from lib.ply import read_ply; fields, comments = read_ply(path)`.
"""


def _room_points(dataset, r):
    """(N, 3) coordinates of room r's original points, in the order of dataset.room_labels(r)."""
    room = dataset.rooms[r]
    xyz = np.empty_like(room.xyz)
    xyz[room.order] = room.xyz  # rooms are stored sorted by grid cell; `order` undoes it
    return xyz


class PredictionSink:
    def __init__(self, save_dir=None, keep=0, source=""):
        """save_dir: folder for the PLY files (None: write nothing); keep: samples kept for
        figures; source: what is evaluated (the checkpoint path), for titles and README.txt."""
        self.save_dir, self.keep, self.source = save_dir, keep, source
        self.dataset = None

    def begin(self, dataset, sample_ids):
        """Called by evaluate before its loop: the split, and the dataset index of each sample
        this process will see, in loader order."""
        self.dataset = dataset
        self.task = dataset.task
        self.sample_ids = iter(sample_ids)
        self.names = list(dataset.class_names)
        # Figures name parts with their category: ShapeNet's part names repeat across categories.
        self.display_names = list(self.names)
        for category, (start, stop) in zip(getattr(dataset, "category_names", ()),
                                           getattr(dataset, "part_ranges", ())):
            for i in range(start, stop):
                self.display_names[i] = f"{category} {self.names[i]}"
        # Per-point (per-shape for cls) confusion over everything this sink sees: the metrics
        # keep none for part segmentation and classification, and the figures need one.
        self.confusion = SemSegMetric(self.names)
        self.kept, self.rows = [], []
        self.voted = False  # rooms rather than samples (S3DIS val / test)

    # ------------------------------------------------------------ fed by evaluate

    def add_batch(self, batch, pred):
        """One batch of shapes (or crops): batch as the loader gives it, pred (B, N) or (B,)."""
        pred, label = pred.cpu(), batch["label"].cpu()
        self.confusion.update(pred, label)
        xyz = batch["xyz"].cpu().numpy()
        categories = batch["category"].tolist() if self.task == "partseg" else [None] * len(xyz)
        for points, p, l, category in zip(xyz, pred.numpy(), label.numpy(), categories):
            self._add(next(self.sample_ids), points, l, p, category)

    def add_room(self, r, pred, label):
        """Room r's voted prediction and labels (N,) over its original points. Every rank
        votes every room, so only the main rank keeps and writes them."""
        if not distributed.is_main():
            return
        self.voted = True
        self.confusion.update(pred, label)
        name = self.dataset.room_names[r]
        self._add(name, _room_points(self.dataset, r), label.numpy(), pred.numpy(), None)

    def _add(self, sample, xyz, label, pred, category):
        name = self._file_name(sample, label, category)
        if self.save_dir:
            self._write(name, xyz, label, pred, category)
        accuracy = float(np.mean(label == pred))
        self.rows.append({"file": name, "sample": sample,
                          "category": "" if category is None else
                          self.dataset.category_names[category],
                          "ground_truth": self._describe(label),
                          "prediction": self._describe(pred),
                          "point_accuracy": f"{accuracy:.4f}"})
        if len(self.kept) < self.keep:
            keep = np.sort(np.random.default_rng(0).permutation(len(xyz))[:MAX_DRAWN_POINTS])
            if np.ndim(label):
                label, pred = label[keep], pred[keep]
            self.kept.append((sample, name, xyz[keep], label, pred, category))

    def _file_name(self, sample, label, category):
        if self.task == "partseg":
            return f"{sample:05d}_{self.dataset.category_names[category]}.ply"
        if self.task == "cls":
            return f"{sample:05d}_{self.names[int(label)]}.ply"
        return f"{sample}.ply" if isinstance(sample, str) else f"{sample:05d}.ply"

    def _describe(self, ids):
        """A classified shape's class name; segmentations are per point (in the file)."""
        return self.names[int(ids)] if np.ndim(ids) == 0 else "per point"

    def _write(self, name, xyz, label, pred, category):
        n = len(xyz)
        label, pred = np.broadcast_to(label, (n,)), np.broadcast_to(pred, (n,))
        dtype = label_dtype(len(self.names))
        ids = range(len(self.names))
        if self.task == "partseg":
            start, stop = self.dataset.part_ranges[category]
            ids = range(start, stop)
            colours = palette(stop - start)[np.clip(pred - start, 0, stop - start - 1)]
        else:
            colours = palette(len(self.names))[pred]
        comments = [f"{self.dataset.__class__.__name__} sample {name[:-4]}"]
        if category is not None:
            comments.append(f"category {self.dataset.category_names[category]}")
        comments.append("ids " + " ".join(f"{i}={self.names[i].replace(' ', '_')}" for i in ids))
        write_ply(os.path.join(self.save_dir, name), xyz, np.round(255 * colours),
                  {"label": label.astype(dtype), "pred": pred.astype(dtype)}, comments)

    # ------------------------------------------------------------ after the loop

    def gather(self):
        """Under DDP: the main rank takes every rank's confusion counts, rows and kept samples
        (each rank wrote its own shard's files already)."""
        parts = distributed.gather_objects((self.confusion, self.rows, self.kept))
        if len(parts) == 1:
            return
        confusions, rows, kept = zip(*parts)
        self.confusion = confusions[0]
        for confusion in confusions[1:]:
            self.confusion.merge(confusion)
        self.rows = sorted(sum(rows, []), key=lambda row: row["file"])
        self.kept = sorted(sum(kept, []), key=lambda item: item[1])[:self.keep]

    def finish(self, split):
        """Main rank: predictions.csv and README.txt beside the PLY files."""
        if not self.save_dir or not distributed.is_main():
            return
        with open(os.path.join(self.save_dir, "predictions.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "sample", "category", "ground_truth",
                                                   "prediction", "point_accuracy"])
            writer.writeheader()
            writer.writerows(self.rows)
        with open(os.path.join(self.save_dir, "README.txt"), "w") as f:
            f.write(README.format(
                ckpt=self.source, split=split, dataset=type(self.dataset).__name__, task=self.task,
                unit="room (every original point, voted over the crops that hold it)"
                if self.voted else "evaluated sample (the points the model saw)",
                coordinates="as in the room's files" if self.voted else "as fed to the model "
                "(normalised)", kind="part" if self.task == "partseg" else "class",
                int_type=label_dtype(len(self.names)).name,
                ids="global part ids" if self.task == "partseg" else "class ids"))

    # ------------------------------------------------------------ figures

    def sample_figures(self):
        """[(file stem, Figure)] of the kept samples: shapes or rooms, ground truth beside
        prediction; classified shapes with their true and predicted class."""
        figures = []
        for sample, name, xyz, label, pred, category in self.kept:
            stem = name[:-4].replace("/", "_")
            title = f"{self.source}  {name[:-4]}"
            if self.task == "partseg":
                start, stop = self.dataset.part_ranges[category]
                fig = shape_figure(xyz, label - start, pred - start, self.names[start:stop], title)
            elif self.task == "cls":
                fig = cls_figure(xyz, self.names[int(label)], self.names[int(pred)], title)
            elif isinstance(sample, str):
                fig = room_figure(xyz, label, pred, self.names, title)
            else:
                fig = shape_figure(xyz, label, pred, self.names, title)
            figures.append((stem, fig))
        return figures

    def save_figures(self, folder, results):
        """sample_figures() and metric_figures(results) as PNG files in folder; their paths."""
        return [save_figure(fig, os.path.join(folder, f"{stem}.png"))
                for stem, fig in self.sample_figures() + self.metric_figures(results)]

    def metric_figures(self, results):
        """[(file stem, Figure)]: the per-category / per-class IoU chart and the confusion
        matrix of the whole split."""
        if self.task == "partseg":
            names, values = list(results["per_category"]), list(results["per_category"].values())
            ylabel = "mean shape IoU"
        elif self.task == "semseg":
            names, values, ylabel = self.names, list(results["per_class"].values()), "IoU"
        else:
            # Classification reports per-class accuracy; its IoU comes from the confusion.
            names, ylabel = self.names, "IoU (shapes)"
            values = list(self.confusion.compute()["per_class"].values())
        unit = "shapes" if self.task == "cls" else "points"
        title = f"{self.source}: per-{'category' if self.task == 'partseg' else 'class'} {ylabel}"
        return [("per_class_iou", per_class_figure(names, values, ylabel, title)),
                ("confusion", confusion_figure(self.confusion.confusion.numpy(),
                                               self.display_names, f"{self.source} ({unit})"))]
