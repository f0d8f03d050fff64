"""Training steps replayed as CUDA graphs (lib/cuda_graphs.py): when they run, the loop's use of
a replayed step, and on a GPU that a replay trains as the eager step does."""
import copy
import functools
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from lib.cuda_graphs import MAX_GRAPHS, GraphedTrainStep, wanted
from lib.experiment import make_loader
from lib.tasks import model_inputs, supervised_loss
from lib.train import autocast, build_optimizer, train_one_epoch
from models import build_model
from toy import PointMLP, ToyPoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_graphs_run_for_one_cuda_process_unless_turned_off():
    assert wanted(None, CUDA, 1) and wanted(True, CUDA, 1)
    assert not wanted(None, torch.device("cpu"), 1)
    assert not wanted(None, CUDA, 2)  # torchrun: DDP's all-reduce is not captured
    assert not wanted(False, CUDA, 1)
    for device, world in ((torch.device("cpu"), 1), (CUDA, 2)):
        with pytest.raises(ValueError, match="--cuda-graphs needs") as error:
            wanted(True, device, world)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py"])
def test_asking_for_graphs_where_they_cannot_run_fails_before_the_run_folder(tmp_path, script):
    out = tmp_path / "run"
    args = [sys.executable, script, "--device", "cpu", "--cuda-graphs", "--out", str(out)]
    if script == "finetune.py":
        args += ["--ckpt", str(tmp_path / "missing.pt"), "--policy", str(tmp_path / "p.json")]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --cuda-graphs needs a CUDA device; drop it or pass --no-cuda-graphs")
    assert not out.exists()  # so the same command without the flag is not refused


class ReplayStandIn:
    """On the CPU, what a replay leaves behind: each parameter's gradient of this batch written
    (not added to the last one's), the loss and logits returned; every other batch None, which
    the loop must train eagerly."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls % 2 == 0:
            return None
        for param in self.model.parameters():
            param.grad = None
        logits = self.model(*model_inputs(batch, "semseg"))
        loss = supervised_loss(logits, batch)
        loss.backward()
        return loss.detach(), logits.detach()


def test_the_loop_steps_on_a_replayed_step_as_on_its_own():
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = PointMLP(batchnorm=True)
        loader = make_loader(ToyPoints(32, jitter=0.05), 8, train=True, seed=1)
        optimizer = build_optimizer(model.parameters(), "sgd", 0.1, 1e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        stand_in = ReplayStandIn(model) if graphed else None
        stats = train_one_epoch(model, loader, optimizer, scheduler, supervised_loss, "semseg",
                                torch.device("cpu"), 0, graphed=stand_in)
        results.append((stats, model.state_dict()))
        if graphed:
            assert stand_in.calls == len(loader) == 4
    (eager_stats, eager_state), (graph_stats, graph_state) = results
    assert graph_stats["loss"] == eager_stats["loss"] and graph_stats["acc"] == eager_stats["acc"]
    for name, value in eager_state.items():
        assert torch.equal(value, graph_state[name]), name


# --- on a GPU -------------------------------------------------------------------------------

def part_batch(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"xyz": torch.rand(b, n, 3, generator=g), "feat": torch.randn(b, n, 3, generator=g),
             "category": torch.randint(16, (b,), generator=g),
             "label": torch.randint(50, (b, n), generator=g)}
    return {key: value.to(CUDA) for key, value in batch.items()}


def tiny_pt():
    torch.manual_seed(0)
    return build_model("pt_seg_tiny", in_channels=3, num_classes=50, num_categories=16).to(CUDA)


def graphed_step(model, amp=False):
    return GraphedTrainStep(model, supervised_loss, "partseg",
                            functools.partial(autocast, CUDA, amp, cache=False))


def largest_gap(xs, ys):
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(xs, ys))


@needs_cuda
def test_a_replayed_step_trains_as_the_eager_step():
    """Three SGD steps on new data each, from one start: eager twice and replayed. CUDA's
    index_add sums in no fixed order, so two eager runs differ by rounding already; the replay
    must stay as close to eager as eager stays to itself (a stale input, a lost gradient or the
    warm-up's BatchNorm updates left in place would be orders of magnitude more)."""
    models = {"eager": tiny_pt()}
    models["again"] = copy.deepcopy(models["eager"])
    models["graphed"] = copy.deepcopy(models["eager"])
    step = graphed_step(models["graphed"])
    optimizers = {key: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
                  for key, m in models.items()}
    losses = {key: [] for key in models}
    first_grads = {}
    for i in range(3):
        batch = part_batch(4, 512, seed=i)  # through the graph's static inputs
        for key, model in models.items():
            if key == "graphed":
                loss, logits = step(batch)
                assert logits.shape == (4, 512, 50)
            else:
                loss = supervised_loss(model(*model_inputs(batch, "partseg")), batch)
                optimizers[key].zero_grad(set_to_none=True)
                loss.backward()
            losses[key].append(float(loss.detach()))
            if i == 0:
                first_grads[key] = [p.grad.clone() for p in model.parameters()]
            optimizers[key].step()
    scale = max(float(g.abs().max()) for g in first_grads["eager"])
    gaps = {key: {"first_grads": largest_gap(first_grads["eager"], first_grads[key]) / scale,
                  "losses": max(abs(a - b) / a for a, b in zip(losses["eager"], losses[key])),
                  "buffers": largest_gap(models["eager"].buffers(), models[key].buffers()),
                  "weights": largest_gap(models["eager"].parameters(), models[key].parameters())}
            for key in ("again", "graphed")}
    floors = {"first_grads": 1e-5, "losses": 1e-5, "buffers": 1e-5, "weights": 1e-5}
    for what, floor in floors.items():
        assert gaps["graphed"][what] <= max(10 * gaps["again"][what], floor), (what, gaps)


@needs_cuda
def test_bf16_autocast_replays_too():
    model = tiny_pt()
    loss, _ = graphed_step(model, amp=True)(part_batch(2, 256))
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


class ReadsTheHost(nn.Module):
    """A forward that synchronises with the host, which no capture can hold."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 50)

    def forward(self, xyz, feat, category):
        scale = float(feat.abs().max())
        return self.linear(xyz) * scale


@needs_cuda
def test_a_step_that_cannot_be_captured_trains_eagerly_with_one_warning():
    model = ReadsTheHost().to(CUDA)
    step = graphed_step(model)
    with pytest.warns(UserWarning, match="could not be captured"):
        assert step(part_batch(2, 64)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert step(part_batch(2, 64, seed=1)) is None  # not tried again
    assert all(p.grad is None for p in model.parameters())
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    batch = part_batch(2, 64)  # and the eager step still runs
    supervised_loss(model(*model_inputs(batch, "partseg")), batch).backward()
    assert model.linear.weight.grad is not None


@needs_cuda
def test_each_batch_shape_gets_its_graph_up_to_the_limit():
    model = tiny_pt()
    step = graphed_step(model)
    shapes = [(4, 256), (3, 256), (2, 256)][:MAX_GRAPHS + 1]
    results = [step(part_batch(*shape)) for shape in shapes]
    assert all(result is not None for result in results[:MAX_GRAPHS])
    assert results[MAX_GRAPHS] is None
    again, _ = step(part_batch(*shapes[0]))
    assert again is results[0][0]  # the first shape's graph replays, into its own loss tensor
