"""Train the toy model with the shared loop; run plainly or under torchrun (gloo on CPU).
Used by test_train.py to compare DDP with single-process training."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib import distributed  # noqa: E402
from lib.checkpoint import unwrap  # noqa: E402
from lib.experiment import make_loader  # noqa: E402
from lib.runlog import RunLog  # noqa: E402
from lib.tasks import supervised_loss  # noqa: E402
from lib.train import build_optimizer, build_scheduler, fit  # noqa: E402
from toy import PointMLP, ToyPoints  # noqa: E402


def main(args):
    """Everything lives in this function's scope, so the DDP model (whose reducer holds gloo
    work and tensors) is freed when it returns: left as module globals, it was freed during
    interpreter finalization, where gloo's threads now and then aborted the process
    ("terminate called without an active exception", SIGABRT; 2 runs in about 45)."""
    _, _, device = distributed.init_distributed(torch.device("cpu"))
    torch.manual_seed(0)
    model = distributed.wrap_model(PointMLP(batchnorm=args.batchnorm), device)
    train = make_loader(ToyPoints(48), args.batch_size, train=True, seed=3)
    val = make_loader(ToyPoints(13, seed=1), 4, train=False)
    opt = build_optimizer(model.parameters(), "sgd", 0.2, 0.0)
    sched = build_scheduler(opt, "cosine", 3, len(train))
    with RunLog(args.out, {}) as log:
        best, metrics = fit(model, train, val, opt, sched, supervised_loss, device, 3, args.out,
                            {"model": {}}, log)
    if distributed.is_main():
        state = unwrap(model).state_dict()
        torch.save({"val": metrics, "state_dict": state}, os.path.join(args.out, "result.pt"))
    distributed.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--batchnorm", action="store_true")
    main(parser.parse_args())
