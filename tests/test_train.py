import os

import pytest
import torch

from lib.checkpoint import torch_load
from lib.experiment import make_loader
from lib.runlog import RunLog
from lib.tasks import supervised_loss
from lib.train import autocast, build_optimizer, build_scheduler, evaluate, fit
from test_fault_drills import tensorboard_points
from toy import PointMLP, ToyPoints


class Interrupt(Exception):
    pass


@pytest.fixture(autouse=True)
def run_logs_closed(monkeypatch):
    """Every test closes the RunLogs it opens: one left open kept its tensorboard writer and
    teed stdout and stderr into its log.txt for the rest of the test process (pytest's capture
    puts its own streams back between a test's phases, so the streams alone do not show it)."""
    opened, init = [], RunLog.__init__

    def recorded(log, *args, **kwargs):
        opened.append(log)
        init(log, *args, **kwargs)
    monkeypatch.setattr(RunLog, "__init__", recorded)
    yield
    assert all(log.console.closed for log in opened if log.enabled), "a RunLog was left open"


def train_toy(out, epochs=4, interrupt_at_step=None, resume=None):
    """Shared loop on the toy task; optionally dies at a global step, or resumes from last.pt."""
    torch.manual_seed(0)
    model = PointMLP()
    train = make_loader(ToyPoints(32, jitter=0.05), 8, train=True, seed=1)
    val = make_loader(ToyPoints(10, seed=1), 4, train=False)
    opt = build_optimizer(model.parameters(), "sgd", 0.1, 1e-4)
    sched = build_scheduler(opt, "cosine", epochs, len(train))
    state = None
    if resume:
        ckpt = torch_load(resume)
        model.load_state_dict(ckpt["state_dict"])
        state = ckpt["resume"]
    steps = [0]

    def loss_fn(logits, batch):
        steps[0] += 1
        if steps[0] == interrupt_at_step:
            raise Interrupt
        return supervised_loss(logits, batch)

    log = RunLog(out, {})
    try:
        fit(model, train, val, opt, sched, loss_fn, torch.device("cpu"), epochs, out,
            {"model": {}}, log, resume=state)
    finally:
        # as the scripts do: tensorboard's thread has written every point before a test reads
        # the events (left open, the last epoch's were there or not as that thread was scheduled)
        log.close()
    return model


def test_resume_after_interruption_ends_where_uninterrupted_run_ends(tmp_path):
    straight = train_toy(str(tmp_path / "a"))
    with pytest.raises(Interrupt):
        train_toy(str(tmp_path / "b"), interrupt_at_step=10)  # 4 steps an epoch: dies in epoch 3
    assert torch_load(str(tmp_path / "b" / "last.pt"))["resume"]["epoch"] == 2
    resumed = train_toy(str(tmp_path / "b"), resume=str(tmp_path / "b" / "last.pt"))
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_fit_writes_best_and_last_and_logs(tmp_path):
    train_toy(str(tmp_path), epochs=2)
    for name in ("best.pt", "last.pt", "args.json", "log.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert "resume" not in torch_load(str(tmp_path / "best.pt"))  # best.pt: no optimizer state
    assert "resume" in torch_load(str(tmp_path / "last.pt"))


def test_evaluate_covers_whole_split_not_batch_average():
    model = PointMLP()
    data = ToyPoints(7, seed=2)
    whole = evaluate(model, make_loader(data, 7, train=False), torch.device("cpu"))
    batched = evaluate(model, make_loader(data, 3, train=False), torch.device("cpu"))
    assert whole["miou"] == pytest.approx(batched["miou"], abs=1e-12)
    assert whole["oa"] == pytest.approx(batched["oa"], abs=1e-12)


def test_autocast_is_bf16_on_the_cpu_only_when_asked():
    """amp None (the scripts' default): fp32 on the CPU; True: bf16 there too; False: never."""
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    for amp, dtype in ((None, torch.float32), (False, torch.float32), (True, torch.bfloat16)):
        with autocast(cpu, amp):
            assert (a @ b).dtype == dtype, amp


def test_non_finite_loss_or_weights_stop_fit_before_any_checkpoint(tmp_path):
    """A loss that turns NaN, or weights that do while the loss still looks fine, stop the run
    with the epoch (and step) named; neither reaches last.pt or best.pt."""
    def run(out, loss_fn):
        torch.manual_seed(0)
        model = PointMLP()
        train = make_loader(ToyPoints(32), 8, train=True, seed=1)
        opt = build_optimizer(model.parameters(), "sgd", 0.1, 0.0)
        with RunLog(out, {}) as log:
            fit(model, train, make_loader(ToyPoints(10, seed=1), 4, train=False), opt,
                build_scheduler(opt, "cosine", 2, len(train)),
                lambda logits, batch: loss_fn(model, logits, batch),
                torch.device("cpu"), 2, out, {"model": {}}, log)

    def nan_loss(model, logits, batch):
        return supervised_loss(logits, batch) * float("nan")

    calls = []

    def nan_weight(model, logits, batch):  # at the epoch's last step: no later loss shows it
        calls.append(1)
        if len(calls) == 4:
            model.outer.bias.data[0] = float("inf")
        return supervised_loss(logits, batch)

    with pytest.raises(FloatingPointError, match=r"epoch 1, step 1 of 4: the training loss"):
        run(str(tmp_path / "loss"), nan_loss)
    with pytest.raises(FloatingPointError, match=r"epoch 1: outer\.bias holds NaN or infinite"):
        run(str(tmp_path / "weights"), nan_weight)
    for folder in ("loss", "weights"):
        assert not {"last.pt", "best.pt"} & set(os.listdir(tmp_path / folder))


def test_a_resumed_schedule_sets_the_learning_rate_of_its_next_step():
    """Resumed as recorded, the optimizer keeps its recorded rate bit for bit; extended (a
    longer cosine), its first step takes the longer schedule's rate, not the old schedule's
    end (0 at the last step of a finished cosine)."""
    from lib.train import restore_resume_state
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(params, "sgd", 0.1, 0.0)
    sched = build_scheduler(opt, "cosine", 2, 5)
    for _ in range(10):
        opt.step()
        sched.step()
    recorded = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": 2,
                "best": 0.0, "rng": None}
    assert opt.param_groups[0]["lr"] == 0.0
    for epochs in (2, 4):
        opt = build_optimizer(params, "sgd", 0.1, 0.0)
        sched = build_scheduler(opt, "cosine", epochs, 5)
        fresh = [group["lr"] for group in opt.param_groups]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("lib.train.set_rng_state", lambda state: None)
            restore_resume_state(recorded, opt, sched)
        expected = 0.1 * build_scheduler(torch.optim.SGD(params, lr=0.1), "cosine", epochs,
                                         5).lr_lambdas[0](10)
        assert opt.param_groups[0]["lr"] == expected
        assert fresh[0] == 0.1 and (expected == 0.0) == (epochs == 2)


def test_each_process_draws_its_own_dropout_masks(tmp_path, monkeypatch):
    """fit seeds torch's generators by (--seed, epoch, process) at each epoch. Seeded by --seed
    alone, every process of a torchrun run drew the same Dropout masks, where one process draws
    each sample its own (here the process number alone differs: one process, no group)."""
    from lib import distributed

    class DropoutMLP(PointMLP):
        def forward(self, xyz, feat):
            hidden = torch.relu(self.inner(torch.cat([xyz, feat], -1)))
            return self.outer(torch.nn.functional.dropout(hidden, 0.5, self.training))

    def trained(rank, out):
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        torch.manual_seed(0)
        model = DropoutMLP()
        # plain loaders: the same batches whatever the process number (a rank's shard differs)
        train = torch.utils.data.DataLoader(ToyPoints(16), 8, drop_last=True)
        val = torch.utils.data.DataLoader(ToyPoints(4, seed=1), 4)
        opt = build_optimizer(model.parameters(), "sgd", 0.1, 0.0)
        with RunLog(str(tmp_path / out), {}) as log:
            fit(model, train, val, opt,
                build_scheduler(opt, "cosine", 2, len(train)), supervised_loss,
                torch.device("cpu"), 2, str(tmp_path / out), {"model": {}}, log, seed=3)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    first = trained(0, "a")
    assert torch.equal(first, trained(0, "b"))
    assert not torch.equal(first, trained(1, "c"))


def test_a_resumed_run_shows_each_training_step_once_in_tensorboard(tmp_path):
    """The interrupted run logged train_step points of its partial epoch; the resumed run logs
    those steps again, and tensorboard drew both (a line folding back) until the resume hid
    the first ones (a purge marker)."""
    def steps(folder):
        return tensorboard_points(folder, "train_step/loss")

    train_toy(str(tmp_path / "a"))
    with pytest.raises(Interrupt):
        train_toy(str(tmp_path / "b"), interrupt_at_step=11)  # 4 steps an epoch: logs step 9
    train_toy(str(tmp_path / "b"), resume=str(tmp_path / "b" / "last.pt"))
    assert steps(tmp_path / "b") == steps(tmp_path / "a")
    assert [step for step, _ in steps(tmp_path / "a")] == [1, 4, 5, 8, 9, 12, 13, 16]


def test_an_epoch_killed_before_its_last_pt_shows_its_points_once(tmp_path, monkeypatch):
    """The per-epoch points (train/, val/) are logged before last.pt (a kill after it lost them):
    a run killed in between redoes the epoch on resume, and the purge marker of the resume hides
    the first points of that epoch, at its last step as train_step's are (tensorboard's marker
    hides every tag past one step: at epoch numbers they stayed, shown twice)."""
    import lib.train
    real_save = lib.train.save_checkpoint

    def killed_at_epoch_3(path, model, meta, *rest):
        if path.endswith("last.pt") and meta["epoch"] == 3:
            raise Interrupt
        return real_save(path, model, meta, *rest)

    def points(folder):
        return tensorboard_points(folder, "val/miou")

    train_toy(str(tmp_path / "a"))
    monkeypatch.setattr(lib.train, "save_checkpoint", killed_at_epoch_3)
    with pytest.raises(Interrupt):
        train_toy(str(tmp_path / "b"))
    assert len(points(tmp_path / "b")) == 3  # epoch 3's were logged before its last.pt
    monkeypatch.setattr(lib.train, "save_checkpoint", real_save)
    train_toy(str(tmp_path / "b"), resume=str(tmp_path / "b" / "last.pt"))
    assert points(tmp_path / "b") == points(tmp_path / "a")
    assert [step for step, _ in points(tmp_path / "a")] == [4, 8, 12, 16]  # 4 steps an epoch
