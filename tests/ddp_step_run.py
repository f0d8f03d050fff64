"""One training step of the tiny part-segmentation Point Transformer in float64, plainly or
under torchrun (gloo on CPU): rank r takes samples r, r + world, ... of one fixed batch. Saves
rank 0's gradients after DDP's averaging. Used by test_distributed.py to show that a step
under N processes is the single-process step, not just close to it.

--quantized: every layer k-means quantized at 4 bits, loss = distillation from the fp32 model
(finetune.py --distill's step)."""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import distributed  # noqa: E402
from lib.checkpoint import unwrap  # noqa: E402
from lib.distill import DistillLoss  # noqa: E402
from lib.quant.layers import named_quantizable, quantize_model  # noqa: E402
from lib.tasks import model_inputs, supervised_loss  # noqa: E402
from models import build_model  # noqa: E402

BATCH, POINTS, CLASSES, CATEGORIES = 4, 2048, 10, 4


def fixed_batch():
    """Uniform clouds of POINTS points: from 2048 up the tiny PT's last stage has more points
    than its k neighbours (with fewer, every stage-4 neighbourhood holds all pairs, whose
    relative positions average to exactly zero, and delta's BatchNorm sits on a ReLU kink)."""
    g = torch.Generator().manual_seed(1)
    xyz = torch.rand(BATCH, POINTS, 3, generator=g, dtype=torch.float64)
    return {"xyz": xyz, "feat": xyz.clone(),
            "label": torch.randint(CLASSES, (BATCH, POINTS), generator=g),
            "category": torch.randint(CATEGORIES, (BATCH,), generator=g)}


def main(args):
    _, _, device = distributed.init_distributed(torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model("pt_seg_tiny", in_channels=3, num_classes=CLASSES,
                        num_categories=CATEGORIES).double()
    loss_fn = supervised_loss
    if args.quantized:
        teacher = copy.deepcopy(model)
        policy = {name: 4 for name, _ in named_quantizable(model)}
        model = quantize_model(model, policy).double()
        loss_fn = DistillLoss(teacher, "partseg", 4.0, 0.5)
    model = distributed.wrap_model(model, device)
    rank, world = distributed.rank(), distributed.world_size()
    batch = {k: v[rank::world] for k, v in fixed_batch().items()}
    loss_fn(model(*model_inputs(batch, "partseg")), batch).backward()
    if distributed.is_main():
        grads = {n: p.grad for n, p in unwrap(model).named_parameters() if p.grad is not None}
        torch.save(grads, args.out)
    distributed.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quantized", action="store_true")
    main(parser.parse_args())
