"""The quantization results table (markdown + JSON) of any task: part segmentation (accuracy,
cat. / ins. mIoU), S3DIS (OA, mAcc, mIoU) or classification (OA, mAcc), with HAQ's budget and
the honest size of each model.

    python -m lib.results_table --run checkpoints/partseg
    python -m lib.results_table --out checkpoints/demo/results "fp32=a.json" "mix=b.json"

--run scores every checkpoint of a run folder on the test split, as eval.py does (sharded over
the processes under torchrun): RUN/pretrain/best.pt ("fp32"), RUN/searched/best.pt,
RUN/finetune/best.pt and RUN/finetune_distill/best.pt (the rows run/finetune.sh writes), then
any other RUN/<name>/best.pt, named by its folder. Each one's figures go to RUN/eval/<name>.json,
the table to RUN/results.md and RUN/results.json. The second form only collects the JSON files
of `eval.py --json` (run/demo.sh).
"""
import json
import os

from lib import distributed, heap
from lib.report import SUMMARY_COLUMNS, format_quant_table, task_of

# run folder -> row name, in table order; other folders follow, sorted, under their own name
KNOWN_RUNS = {"pretrain": "fp32", "searched": "searched", "finetune": "searched, finetune",
              "finetune_distill": "searched, finetune, distill"}


def table_row(name, results):
    """One row: the task's summary figures, the HAQ budget ratio and the honest size."""
    row = {"name": name}
    row.update({key: results.get(key) for _, key in SUMMARY_COLUMNS[task_of(results)]})
    row["budget_ratio"] = results["budget_ratio"]
    row["honest_kib"] = results["honest_bytes"] / 1024
    return row


def run_checkpoints(run):
    """[(row name, folder name, best.pt path)] of a run folder, in table order."""
    if not os.path.isdir(run):
        raise FileNotFoundError(f"{run}: no such run folder")
    found = sorted(d for d in os.listdir(run) if os.path.isfile(os.path.join(run, d, "best.pt")))
    ordered = [d for d in KNOWN_RUNS if d in found] + [d for d in found if d not in KNOWN_RUNS]
    if not ordered:
        raise FileNotFoundError(f"{run}: no <stage>/best.pt checkpoints in this run folder")
    return [(KNOWN_RUNS.get(d, d), d, os.path.join(run, d, "best.pt")) for d in ordered]


def stage_problems(folder, path, fp32_sha256):
    """Why a stage's best.pt does not belong in the table as a finished row of this run, in
    words: its run has not ended (lib/stage_status.progress: epochs or episodes short of those
    set, a fine-tune's test scoring or a best.pt that a kill kept from being written, or a live
    process still writing it), it was quantized from another fp32 model than the run's
    pretrain/best.pt (SHA-256 fp32_sha256: a pretraining replaced or extended after the search),
    or the policy file it was quantized with now holds another policy (a search run again after
    the fine-tune)."""
    from lib.checkpoint import checkpoint_meta
    from lib.stage_status import progress
    problems = []
    run = progress(folder)
    if run.state in ("interrupted", "restartable", "running"):
        problems.append(f"unfinished: {run.why}")
    meta = checkpoint_meta(path)
    quant = meta.get("quant") if isinstance(meta.get("quant"), dict) else {}
    teacher = quant.get("teacher_sha256")
    if teacher and fp32_sha256 and teacher != fp32_sha256:
        problems.append("quantized from another fp32 model than pretrain/best.pt")
    changed = _policy_changed(quant, folder, meta.get("args", {}) if quant else {})
    if changed:
        problems.append(f"quantized with another policy than {changed} holds now")
    return problems


def _policy_changed(quant, folder, args):
    """The policy file a fine-tune applied (where a run folder moved with it: the copy's own),
    shown from the run folder, when it now holds another policy than the one recorded; None
    when it holds the same, is gone, or none was recorded."""
    from lib.cli import path_inside, run_input
    from lib.stage_status import input_digest
    recorded, digest = quant.get("policy_file"), quant.get("policy_digest")
    if not (isinstance(recorded, str) and digest):
        return None
    policy = run_input(recorded, str(folder), args.get("out"))
    if not os.path.isfile(policy):
        return None
    try:
        if input_digest("policy", policy) == digest:
            return None
    except ValueError:  # no longer a policy file
        pass
    return path_inside(policy, os.path.dirname(os.path.abspath(folder))) or policy


def score_run(run, data_root=None, batch_size=16, device=None, workers=0, amp=None):
    """Evaluates every checkpoint of `run` on its test split (amp: bf16 autocast; None: as each
    run recorded); returns [(row name, results)] and writes RUN/eval/<folder>.json (main
    rank)."""
    from lib.checkpoint import file_sha256  # torch and the readers: only for --run
    from lib.experiment import evaluate_checkpoint
    scored = []
    # rank 0's list on every rank: a stage that writes its first best.pt between two ranks'
    # listings gave them lists of different lengths, and the ranks' collectives never met again
    checkpoints = distributed.broadcast_object(run_checkpoints(run))
    fp32 = os.path.join(run, "pretrain", "best.pt")
    fp32_sha256 = file_sha256(fp32) if os.path.isfile(fp32) else None
    for name, folder, path in checkpoints:
        problems = stage_problems(os.path.join(run, folder), path, fp32_sha256)
        if problems:
            name = f"{name} [{'; '.join(problems)}]"
            if distributed.is_main():
                print(f"{path}: {'; '.join(problems)}", flush=True)
        _, results = evaluate_checkpoint(path, data_root, "test", batch_size, device, workers,
                                         amp)
        if distributed.is_main():
            os.makedirs(os.path.join(run, "eval"), exist_ok=True)
            with open(os.path.join(run, "eval", folder + ".json"), "w") as f:
                json.dump(results, f, indent=2)
            print(f"{path}: scored", flush=True)
        scored.append((name, results))
    return scored


def read_rows(specs):
    """[(row name, results)] from NAME=eval.json arguments."""
    scored = []
    for spec in specs:
        name, sep, path = spec.rpartition("=")
        if not sep:
            raise SystemExit(f"row {spec!r}: write it as NAME=results.json")
        with open(path) as f:
            scored.append((name, json.load(f)))
    return scored


def write_table(scored, out):
    """out.md and out.json; returns the markdown table."""
    rows = [table_row(name, results) for name, results in scored]
    table = format_quant_table(rows)
    with open(out + ".md", "w") as f:
        f.write(table + "\n")
    with open(out + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    return table


def main(args):
    if args.run:
        from lib.cli import resolve_device
        _, _, device = distributed.init_distributed(resolve_device(args.device))
        heap.keep_freed_memory(device)  # each batch's temporaries reused, not re-faulted
        scored = score_run(args.run, args.data_root, args.batch_size, device, args.workers,
                           args.amp)
        out = args.out or os.path.join(args.run, "results")
    else:
        if not args.rows or not args.out:
            raise SystemExit("give --run RUN, or --out PATH and NAME=eval.json rows")
        scored, out = read_rows(args.rows), args.out
    if distributed.is_main():
        print(write_table(scored, out))
        print(f"written: {out}.md, {out}.json")
    distributed.cleanup()


def get_args_parser():
    from lib.cli import add_flags, make_parser
    p = make_parser(__doc__)
    p.add_argument("--run", default=None, help="run folder whose checkpoints to score")
    p.add_argument("--out", default=None,
                   help="path without extension; writes .md and .json (None with --run: "
                        "RUN/results)")
    # the flags eval.py takes for the same scoring, defined once (lib/cli.py): run/eval.sh
    # hands its extra flags to either
    add_flags(p, "data_root", "batch_size", "device", "workers", "amp")
    p.add_argument("rows", nargs="*", help="NAME=eval.json, in table order (without --run)")
    return p


if __name__ == "__main__":
    from lib.cli import run_script
    run_script(main, get_args_parser())
