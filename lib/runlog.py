"""What every run folder gets: args.json (with the git commit), a JSON-lines log, tensorboard
events (scalars, per-category / per-class values, figures) and log.txt, a copy of the console
output. Only the main DDP rank writes."""
import json
import os
import sys
import time

from lib.checkpoint import atomic_write, atomic_write_json, git_commit
from lib.distributed import is_main
from lib.rundir import clear_replaced


FIGURES_PER_EVAL = 2  # predictions drawn into tensorboard at each evaluation (fit)


class RunLog:
    def __init__(self, out_dir, args_dict, log_name="log.jsonl", figures=FIGURES_PER_EVAL):
        """figures: how many validation predictions fit() draws into tensorboard per epoch;
        the same on every rank (the sink it asks for takes part in a collective)."""
        self.out_dir = out_dir
        self.enabled = is_main()
        self.writer = None  # the SummaryWriter, opened at the first point (_events)
        self._purge_step = None
        self.figures = figures
        self.tees = []
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        clear_replaced(out_dir)  # --overwrite's old run goes now, at the new run's first write
        # each start rewrites it (a resume too), whole or not at all: opened for writing first,
        # it stood empty while git was asked for the commit, and a kill then left it so
        atomic_write_json(os.path.join(out_dir, "args.json"),
                          dict(args_dict, git_commit=git_commit()), default=str)
        self.log_path = os.path.join(out_dir, log_name)
        self.console = open(os.path.join(out_dir, "log.txt"), "a")
        self.tees = [_Tee(sys, name, self.console) for name in ("stdout", "stderr")]

    def resume_at(self, step):
        """A resumed run goes on from global training step `step` (the steps its last checkpoint
        holds): tensorboard hides the points the interrupted run logged past it, by a purge
        marker at step + 1 that the resumed run's events follow: a partial epoch's train_step
        points, and the per-epoch points (fit logs them at the epoch's last step) of an epoch
        killed before its last.pt, which the resumed run logs again."""
        self.purge_from(step + 1)

    def purge_from(self, step):
        """Hides every point at `step` or later that earlier events files hold (SummaryWriter's
        purge_step, set on the events file the run opens at its first point): a resumed run
        logs those steps again."""
        self._purge_step = step
        if self.writer is not None:  # points already logged: the rest go to a file of their own
            self.writer.close()
            self.writer = None

    def _events(self):
        """The SummaryWriter, or None on ranks that do not write; opened at the first point,
        its file named to be read after every events file the folder holds."""
        if self.writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter  # lazy: slow to import
            folder = os.path.join(self.out_dir, "tb")
            _wait_past_events_in(folder)
            self.writer = SummaryWriter(folder, purge_step=self._purge_step)
        return self.writer

    def flush_events(self):
        """Waits until the points logged so far are in the events file (SummaryWriter writes
        them from a thread of its own): a caller that logs them before a checkpoint knows that
        a kill after the checkpoint cannot lose them."""
        if self.writer is not None:
            self.writer.flush()

    def scalars(self, prefix, values, step):
        """Every numeric entry of `values` as `prefix/name` in tensorboard; a dict entry (the
        per-category / per-class metrics) as its own group `prefix_name/key`."""
        if not self.enabled:
            return
        for name, value in values.items():
            if isinstance(value, dict):
                self.scalars(f"{prefix}_{name}", value, step)
            elif isinstance(value, (int, float)) and value == value:  # skip None and NaN
                self._events().add_scalar(f"{prefix}/{name}", value, step)

    def figure(self, tag, fig, step):
        """A matplotlib Figure as an image in tensorboard."""
        if self.enabled:
            from lib.render import figure_image
            self._events().add_image(tag, figure_image(fig), step, dataformats="HWC")

    def prediction_sink(self):
        """A sink for lib.train.evaluate that keeps the first `figures` predictions (on every
        rank, or on none), or None."""
        if not self.figures:
            return None
        from lib.predictions import PredictionSink
        return PredictionSink(keep=self.figures, source=os.path.basename(self.out_dir))

    def predictions(self, prefix, sink, step):
        """The kept predictions of `sink` as images `prefix_predictions/<sample>`."""
        if self.enabled and sink is not None:
            for stem, fig in sink.sample_figures():
                self.figure(f"{prefix}_predictions/{stem}", fig, step)

    def record(self, entry):
        """One JSON line (an epoch or an episode)."""
        if not self.enabled:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(dict(entry, time=time.time()), default=float) + "\n")

    def keep_records(self, count):
        """Keep the first `count` JSON lines: at resume, the epochs or episodes the resumed
        state holds. Lines written after it (before a crash) would otherwise appear twice."""
        if not self.enabled or not os.path.isfile(self.log_path):
            return
        with open(self.log_path) as f:
            lines = f.readlines()[:count]

        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(lines)
        atomic_write(self.log_path, write)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Writes out the tensorboard events and gives stdout and stderr back; a RunLog left open
        goes on copying the process's console into its log.txt."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.enabled and not self.console.closed:
            for tee in self.tees:
                tee.restore()
            self.console.close()


def _wait_past_events_in(folder):
    """Returns once a new events file in `folder` will be read after those it holds. Tensorboard
    reads a folder's files in name order, and a name starts with the second it was opened in
    (then the host, the pid and a per-process counter, compared as text): a file opened in the
    same second as an earlier one could be read first, and the earlier file's points then looked
    out of order and were dropped (a run resumed at once after a crash showed none of the points
    before it). Waits at most a second, only then: a file named after a later second than now
    (a folder copied from a machine whose clock is ahead) held the first point until that
    second, an hour for an hour ahead, and every other DDP rank at its next collective; such a
    file may be read after the new one, a chart's matter, not the run's."""
    stamps = [int(part) for name in (os.listdir(folder) if os.path.isdir(folder) else ())
              if name.startswith("events.out.tfevents.")
              for part in name.split(".")[3:4] if part.isdigit()]
    if stamps:
        time.sleep(min(1.0, max(0.0, max(stamps) + 1 - time.time())))


class _Tee:
    """Replaces sys.<name> with itself and copies what is written to `file` as a terminal would
    finally show it: a progress bar redrawn after carriage returns keeps only its last state,
    and a bar that is erased (tqdm's leave=False) leaves nothing."""

    def __init__(self, module, name, file):
        self.module, self.name, self.file = module, name, file
        self.stream = getattr(module, name)
        self.pending = ""  # the current line, up to its last carriage return dropped
        setattr(module, name, self)

    def write(self, text):
        self.stream.write(text)
        if self.file.closed:  # a stream kept by someone after the run log was closed
            return len(text)
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            shown = line.rsplit("\r", 1)[-1]
            if shown.strip() or "\r" not in line:
                self.file.write(shown + "\n")
        self.pending = self.pending.rsplit("\r", 1)[-1]
        if lines:
            self.file.flush()
        return len(text)

    def flush(self):
        self.stream.flush()
        if not self.file.closed:
            self.file.flush()

    def restore(self):
        if self.pending.strip():
            self.file.write(self.pending + "\n")
        if getattr(self.module, self.name) is self:
            setattr(self.module, self.name, self.stream)

    def __getattr__(self, name):  # isatty, fileno, encoding ... of the real stream
        return getattr(self.stream, name)
