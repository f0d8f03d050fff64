"""Train the toy model with the shared loop; run plainly or under torchrun (gloo on CPU).
Used by test_train.py to compare DDP with single-process training."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import distributed  # noqa: E402
from lib.experiment import make_loader  # noqa: E402
from lib.runlog import RunLog  # noqa: E402
from lib.tasks import supervised_loss  # noqa: E402
from lib.train import build_optimizer, build_scheduler, fit  # noqa: E402
from toy import PointMLP, ToyPoints  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--batch-size", type=int, required=True)
args = p.parse_args()
_, world, device = distributed.init_distributed(torch.device("cpu"))
torch.manual_seed(0)
model = PointMLP()
if world > 1:
    model = torch.nn.parallel.DistributedDataParallel(model)
train = make_loader(ToyPoints(48), args.batch_size, train=True, seed=3)
val = make_loader(ToyPoints(13, seed=1), 4, train=False)
opt = build_optimizer(model.parameters(), "sgd", 0.2, 0.0)
sched = build_scheduler(opt, "cosine", 3, len(train))
best, metrics = fit(model, train, val, opt, sched, supervised_loss, device, 3, args.out,
                    {"model": {}}, RunLog(args.out, {}))
if distributed.is_main():
    torch.save({"val": metrics, "state_dict": (model.module if world > 1 else model).state_dict()},
               os.path.join(args.out, "result.pt"))
distributed.cleanup()
