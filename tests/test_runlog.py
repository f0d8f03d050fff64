"""The run folder's log.txt (console copy) and tensorboard contents: per-category scalars,
images; and fit() logging its best metric and predictions at each evaluation."""
import os
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lib.runlog import RunLog
from lib.tasks import supervised_loss
from lib.train import build_optimizer, build_scheduler, fit
from toy import PointMLP, ToyPoints


def events(folder):
    accumulator = EventAccumulator(os.path.join(folder, "tb"), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


def test_log_txt_holds_the_console_as_a_terminal_shows_it(tmp_path):
    stdout, stderr = sys.stdout, sys.stderr
    log = RunLog(str(tmp_path), {})
    print("epoch 1/2  loss 0.5")
    sys.stderr.write("\rtrain 1:  50%|#####     |\rtrain 1: 100%|##########|")  # a bar redrawn
    sys.stderr.write("\r                    \r")                                # and erased
    sys.stderr.write("\rsearch: 100%|##########| 3/3\n")                        # a bar that stays
    print("")
    print("done")
    log.close()
    assert sys.stdout is stdout and sys.stderr is stderr  # closing puts the streams back
    print("after close")
    text = (tmp_path / "log.txt").read_text()
    assert text == "epoch 1/2  loss 0.5\nsearch: 100%|##########| 3/3\n\ndone\n"


def test_a_run_log_used_as_a_context_closes_when_the_run_fails(tmp_path):
    stdout, stderr = sys.stdout, sys.stderr
    with pytest.raises(FloatingPointError):
        with RunLog(str(tmp_path), {}):
            print("epoch 1/2  loss nan")
            raise FloatingPointError("non-finite loss")
    assert sys.stdout is stdout and sys.stderr is stderr
    assert (tmp_path / "log.txt").read_text() == "epoch 1/2  loss nan\n"


def test_nested_metrics_become_their_own_scalar_groups_and_figures_images(tmp_path):
    from matplotlib.figure import Figure
    log = RunLog(str(tmp_path), {})
    log.scalars("val", {"ins_miou": 0.5, "per_category": {"Airplane": 0.25, "Bag": None},
                        "confusion": [[1, 0], [0, 1]]}, 3)
    fig = Figure(figsize=(2, 1), dpi=50)
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    log.figure("val_predictions/first", fig, 3)
    log.close()
    tb = events(str(tmp_path))
    assert set(tb.Tags()["scalars"]) == {"val/ins_miou", "val_per_category/Airplane"}
    assert [(e.step, e.value) for e in tb.Scalars("val_per_category/Airplane")] == [(3, 0.25)]
    (image,) = tb.Images("val_predictions/first")
    assert (image.width, image.height) == (100, 50)


def test_fit_logs_best_metric_and_prediction_images_every_epoch(tmp_path):
    torch.manual_seed(0)
    train = torch.utils.data.DataLoader(ToyPoints(16), batch_size=4, shuffle=True)
    val = torch.utils.data.DataLoader(ToyPoints(8, seed=1), batch_size=4)
    model = PointMLP()
    opt = build_optimizer(model.parameters(), "adamw", 0.05, 0.0)
    log = RunLog(str(tmp_path), {}, figures=1)
    best, _ = fit(model, train, val, opt, build_scheduler(opt, "cosine", 2, len(train)),
                  supervised_loss, torch.device("cpu"), 2, str(tmp_path), {"model": {}}, log)
    log.close()
    tb = events(str(tmp_path))
    best_curve = [e.value for e in tb.Scalars("val/best_miou")]
    miou = [e.value for e in tb.Scalars("val/miou")]
    assert best_curve == list(np.maximum.accumulate(miou)) and np.isclose(best_curve[-1], best)
    assert {"val_per_class/left", "val_per_class/middle"} <= set(tb.Tags()["scalars"])
    (tag,) = tb.Tags()["images"]  # the first val sample, drawn after each of the 2 epochs
    assert tag == "val_predictions/00000" and [e.step for e in tb.Images(tag)] == [4, 8]
    assert "epoch 2/2" in (tmp_path / "log.txt").read_text()


class Killed(BaseException):
    """Stands for a kill: nothing handles it."""


def test_a_start_killed_while_it_records_its_flags_keeps_the_last_args_json(tmp_path,
                                                                             monkeypatch):
    """Each start of a run (a resume too) rewrites args.json. It was opened for writing (emptied)
    before git was asked for the commit, so a kill then left an empty args.json in a folder
    whose last.pt goes on; now the file is replaced whole or not at all."""
    import json

    import lib.runlog
    (tmp_path / "args.json").write_text(json.dumps({"epochs": 2}))

    def killed():
        raise Killed
    monkeypatch.setattr(lib.runlog, "git_commit", killed)
    try:
        RunLog(str(tmp_path), {"epochs": 3})
    except Killed:
        pass
    assert json.loads((tmp_path / "args.json").read_text()) == {"epochs": 2}
    assert sorted(os.listdir(tmp_path)) == ["args.json"]  # no temporary left either
    monkeypatch.undo()
    RunLog(str(tmp_path), {"epochs": 3}).close()
    assert json.loads((tmp_path / "args.json").read_text())["epochs"] == 3


def test_a_resume_in_the_same_second_keeps_the_points_logged_before_it(tmp_path):
    """Tensorboard reads a folder's events files in name order: time in whole seconds, then
    host, pid and a writer counter compared as text. A run resumed within the second of the
    crash (a toy run, a test) could get a file read before the crashed run's, whose points
    then looked out of order and were dropped: CI saw train_step points 1-8 vanish. The old
    file is named here as one with a larger pid or counter would be, and the resume starts in
    its second."""
    time.sleep(1 - time.time() % 1)  # both starts in the same second, however fast
    with RunLog(str(tmp_path), {}) as log:
        log.scalars("train_step", {"loss": 1.0}, 1)
        log.scalars("train_step", {"loss": 2.0}, 2)
    (old,) = (tmp_path / "tb").iterdir()
    old.rename(old.with_name(old.name.rsplit(".", 1)[0] + ".99999"))
    with RunLog(str(tmp_path), {}) as log:
        log.resume_at(2)
        log.scalars("train_step", {"loss": 3.0}, 3)
    points = events(str(tmp_path)).Scalars("train_step/loss")
    assert [(p.step, p.value) for p in points] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_an_events_file_named_ahead_of_the_clock_holds_the_first_point_a_second_at_most(
        tmp_path, monkeypatch):
    """A run folder copied from a machine whose clock is ahead holds events files named after a
    later second than now: the first point waited for that second (an hour here), and every
    other DDP rank with it at its next collective."""
    import types
    import lib.runlog
    (tmp_path / "tb").mkdir()
    ahead = tmp_path / "tb" / f"events.out.tfevents.{int(time.time()) + 3600}.elsewhere.1.0"
    ahead.write_bytes(b"")
    waits = []
    monkeypatch.setattr(lib.runlog, "time", types.SimpleNamespace(time=time.time,
                                                                  sleep=waits.append))
    with RunLog(str(tmp_path), {}) as log:
        log.scalars("train_step", {"loss": 1.0}, 1)
    assert waits and max(waits) <= 1.0
