"""What every run folder gets: args.json (with the git commit), a JSON-lines log, and
tensorboard events. Only the main DDP rank writes."""
import json
import os
import time

from lib.checkpoint import atomic_write, git_commit
from lib.distributed import is_main


class RunLog:
    def __init__(self, out_dir, args_dict, log_name="log.jsonl"):
        self.out_dir = out_dir
        self.enabled = is_main()
        self.writer = None
        if not self.enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "args.json"), "w") as f:
            json.dump(dict(args_dict, git_commit=git_commit()), f, indent=2, default=str)
        self.log_path = os.path.join(out_dir, log_name)
        from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is slow to import
        self.writer = SummaryWriter(os.path.join(out_dir, "tb"))

    def scalars(self, prefix, values, step):
        """Every numeric entry of `values` as `prefix/name` in tensorboard."""
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and value == value:  # skip None and NaN
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

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

    def close(self):
        if self.writer is not None:
            self.writer.close()
