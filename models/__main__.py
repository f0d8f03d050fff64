"""python -m models: parameter counts of every model (in_channels=3; pt_seg 50 parts of 16
categories, pt_semseg 13 classes, pt_cls / pct_cls 40 classes).
python -m models --time pt_seg_tiny [--batch-size 16 --points 2048]: also seconds per training
step (forward, backward, SGD step) on random clouds, on the CPU."""
import argparse
import time

import torch

from models import MODELS, build_model

LABEL_SPACE = {"pt_seg": dict(num_classes=50, num_categories=16), "pt_semseg": dict(num_classes=13),
               "pt_cls": dict(num_classes=40), "pct_cls": dict(num_classes=40)}


def kwargs_for(name):
    return dict(in_channels=3, **LABEL_SPACE[name.removesuffix("_tiny")])


def train_step_seconds(name, batch_size, points, steps):
    """Median seconds of a training step after one warm-up step."""
    kwargs = kwargs_for(name)
    model = build_model(name, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    xyz = torch.rand(batch_size, points, 3)
    inputs = (xyz, torch.randn(batch_size, points, 3))
    if "num_categories" in kwargs:
        inputs += (torch.randint(kwargs["num_categories"], (batch_size,)),)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(*inputs).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time", nargs="+", default=[], choices=list(MODELS), metavar="NAME")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--points", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    return parser


def main(args):
    for name in MODELS:
        n = sum(p.numel() for p in build_model(name, **kwargs_for(name)).parameters())
        print(f"{name:16s} {n:>12,d} parameters")
    torch.manual_seed(0)
    for name in args.time:
        seconds = train_step_seconds(name, args.batch_size, args.points, args.steps)
        print(f"{name}: {seconds:.3f} s per training step, B={args.batch_size} "
              f"N={args.points}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
