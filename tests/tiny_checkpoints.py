"""Tiny synthetic data of every task and untrained checkpoints for it, saved as the scripts save
theirs: enough for tests of what reads checkpoints (eval.py, the README's Python example)."""
from pathlib import Path

import torch

from lib.checkpoint import save_checkpoint
from lib.data.synthetic import write_cls, write_parts
from lib.data.synthetic_rooms import write_rooms
from lib.experiment import dataset_meta, load_split, model_kwargs
from lib.quant import list_quantizable, quantize_model, uniform_policy
from models import build_model

# dataset name, root below the data folder, model, points per sample
TASKS = {"partseg": ("synthetic_parts", "parts", "pt_seg_tiny", 256),
         "semseg": ("synthetic_rooms", "rooms", "pt_semseg_tiny", 512),
         "cls": ("synthetic_cls", "cls/modelnet40_normal_resampled", "pt_cls_tiny", 256)}


def write_tiny_data(root, tasks=tuple(TASKS)):
    """A few test shapes / two test rooms per task under `root` (a Path)."""
    if "partseg" in tasks:
        write_parts(root / "parts", seed=0, train_shapes=1, eval_shapes=2)
    if "cls" in tasks:
        write_cls(root / "cls", seed=0, train_shapes=1, eval_shapes=2)
    if "semseg" in tasks:
        write_rooms(str(root / "rooms"), seed=0, areas=(5,), rooms_per_area=2, points_per_m2=40.0)
    return root


def make_checkpoint(path, task, data_root, packed=False):
    """An untrained model of the task (its predictions are arbitrary, which is all a round trip
    needs), optionally quantized to 3 bits, which saves it packed. Returns the path as str."""
    name, sub, model_name, num_points = TASKS[task]
    root = str(Path(data_root) / sub)
    dataset = load_split(name, root, "test", num_points)
    torch.manual_seed(0)
    kwargs = model_kwargs(model_name, dataset)
    model = build_model(model_name, **kwargs)
    quant = None
    if packed:
        batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
        inputs = (batch["xyz"], batch["feat"]) + ((batch["category"],) if task == "partseg" else ())
        policy = uniform_policy(list_quantizable(model, inputs), 3)
        quantize_model(model, policy)
        quant = {"bits": policy, "method": "kmeans"}
    meta = {"model": {"name": model_name, "kwargs": kwargs},
            "dataset": dataset_meta(name, root, dataset, num_points), "args": {}, "quant": quant}
    save_checkpoint(str(path), model.eval(), meta)
    return str(path)
