"""Search strategies compared at equal cost: HAQ's DDPG agent, random search with as many
evaluated policies, a sensitivity-guided exact allocation and the largest uniform width within the
budget (lib/haq/strategies.py). Each picks its policy on held-out training data (the reward's
data, as search.py measures it); every picked policy is then scored on the TEST split, before and
after the same centroid fine-tune (finetune.py's: AdamW, cosine, lib.train.fit), for every seed
and budget. Writes results.md / results.json (and a run folder per fine-tune) to --out.

    python -m lib.haq.compare --ckpt checkpoints/demo/pretrain/best.pt --out checkpoints/demo/compare

Seeds vary the agent's and random search's draws and the fine-tune's shuffling; the reward's data
(--val-size samples of the held-out split, drawn with --val-seed) is the same for all, so the
sensitivity table is measured once and serves every budget and seed.
"""
import argparse
import copy
import json
import os
import statistics
import time

import torch

from lib import heap
from lib.checkpoint import load_checkpoint
from lib.cli import (HelpFormatter, bit_width, fraction, keep_first_last_arg, nonneg_int,
                     parse_keep, positive_float, positive_fraction, positive_int, resolve_device,
                     run_script)
from lib.experiment import (check_same_data, evaluate_checkpoint, example_inputs, load_split,
                            make_loader, recorded_data_root)
from lib.haq import strategies
from lib.haq.env import QuantEnv
from lib.haq.policy_eval import PolicyEvaluator, cached_batches
from lib.policy_file import recorded_keep, write_policy
from lib.quant import called_layers, keep_first_last, list_quantizable, quantize_model
from lib.quant.size import budget_ratio, honest_size_bytes
from lib.report import markdown_table, percent
from lib.runlog import RunLog
from lib.tasks import supervised_loss
from lib.train import build_optimizer, build_scheduler, evaluate, fit

STRATEGIES = ("ddpg", "random", "sensitivity", "uniform")
LABELS = {"ddpg": "HAQ DDPG", "random": "random search", "sensitivity": "sensitivity + knapsack",
          "uniform": "uniform k-means"}


def get_args_parser():
    # the README gives this --help as the place to read the defaults: every flag shows its own
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="fp32 checkpoint (pretrain.py)")
    p.add_argument("--out", default=None, help="results folder; None: <ckpt folder>/../compare")
    p.add_argument("--budgets", type=positive_fraction, nargs="+", default=[0.1, 0.0625],
                   help="preserve ratios (fractions of the fp32 weight bits)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one search and fine-tune per seed and budget")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES,
                   help="which strategies to compare")
    p.add_argument("--evaluations", type=positive_int, default=30,
                   help="policies DDPG and random search each evaluate (DDPG's episodes)")
    p.add_argument("--warmup", type=nonneg_int, default=10, help="DDPG's random episodes first")
    p.add_argument("--sigma-decay", type=fraction, default=0.9,
                   help="as run/demo.sh's short search")
    p.add_argument("--min-bit", type=bit_width, default=1,
                   help="1: at a 2-bit average, min 2 would leave uniform 2-bit the only policy")
    p.add_argument("--max-bit", type=bit_width, default=8, help="largest bit width searched")
    p.add_argument("--keep-first-last", type=keep_first_last_arg, default="8",
                   help="first layer and classifier at BITS or fp32, charged to the budget "
                        "('' searches them too)")
    p.add_argument("--val-size", type=positive_int, default=16,
                   help="held-out samples the searches see")
    p.add_argument("--val-seed", type=int, default=0, help="which held-out samples")
    p.add_argument("--ft-epochs", type=positive_int, default=1, help="centroid fine-tune epochs")
    p.add_argument("--ft-samples", type=nonneg_int, default=192,
                   help="training samples the fine-tune sees, drawn per seed (0: the whole split)")
    p.add_argument("--lr", type=positive_float, default=1e-3,
                   help="fine-tune learning rate (AdamW)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="samples per batch (reward, fine-tune and test scoring)")
    p.add_argument("--data-root", default=None,
                   help="dataset folder; None: the one the checkpoint records")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available, else the CPU")
    return p


class CountingEvaluator:
    """The search's evaluate_policy, counting its calls: the cost every strategy is charged."""

    def __init__(self, evaluator):
        self.evaluator, self.calls = evaluator, 0

    def __call__(self, bits):
        self.calls += 1
        return self.evaluator(bits)


def warm_kmeans(evaluator, layers, widths):
    """Cluster every (layer, width) once up front, so no strategy's wall time pays for clusterings
    that another strategy happened to make first."""
    modules = dict(evaluator.fp32_model.named_modules())
    for layer in layers:
        for bits in widths:
            evaluator.cache.cluster(layer.name, modules[layer.name].weight, bits, evaluator.method)


def run_strategy(name, env, counter, args, seed, drops):
    calls, start = counter.calls, time.perf_counter()
    if name == "ddpg":
        record = strategies.ddpg_search(env, args.evaluations, args.warmup, seed, args.sigma_decay)
    elif name == "random":
        record = strategies.random_search(env, args.evaluations, seed)
    elif name == "sensitivity":
        record = strategies.sensitivity_allocation(env, drops["drops"])
    else:
        record = strategies.uniform_within_budget(env, range(args.min_bit, args.max_bit + 1))
    seconds, evaluations = time.perf_counter() - start, counter.calls - calls
    if name == "sensitivity":  # the shared measurement is part of its cost
        seconds, evaluations = seconds + drops["seconds"], evaluations + drops["evaluations"]
    return {"bits": record["bits"], "val_metric": record["metric"],
            "budget_ratio": record["budget_ratio"], "evaluations": evaluations, "seconds": seconds}


class TrainSubset(torch.utils.data.Subset):
    """Part of a training split that still answers for it (task, label space) in the loop."""

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.dataset, name)


class Scorer:
    """Test-split scores of a policy before and after the centroid fine-tune."""

    def __init__(self, args, meta, fp32, evaluator, device):
        data = meta["dataset"]
        self.args, self.meta, self.fp32, self.device = args, meta, fp32, device
        self.root = args.data_root or recorded_data_root(args.ckpt, meta)
        self.cache, self.before = evaluator.cache, {}
        self.train = load_split(data["name"], self.root, "train", data["num_points"], augment=True)
        val = load_split(data["name"], self.root, "val", data["num_points"])
        self.val_loader = make_loader(val, args.batch_size, False)
        self.test_loader = make_loader(load_split(data["name"], self.root, "test",
                                                  data["num_points"]), args.batch_size, False)

    def quantized(self, bits):
        return quantize_model(copy.deepcopy(self.fp32), bits, cache=self.cache)

    def test(self, model):
        return evaluate(model, self.test_loader, self.device, desc="test")

    def before_finetune(self, bits):
        """Deterministic in the policy, so shared by the seeds that pick the same one."""
        key = json.dumps(bits, sort_keys=True)
        if key not in self.before:
            model = self.quantized(bits)
            self.before[key] = dict(self.test(model), budget_ratio=budget_ratio(model),
                                    honest_bytes=honest_size_bytes(model))
        return self.before[key]

    def after_finetune(self, bits, seed, out):
        """finetune.py's fine-tune of the policy (plain loss, AdamW, cosine), best-on-val
        checkpoint scored on test as finetune.py scores it."""
        args = self.args
        torch.manual_seed(seed)
        model = self.quantized(bits).to(self.device)
        train = self.train
        if args.ft_samples:
            picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
            train = TrainSubset(train, picks[:args.ft_samples].tolist())
        train_loader = make_loader(train, args.batch_size, True, seed)
        optimizer = build_optimizer(model.parameters(), "adamw", args.lr, 0.0)
        scheduler = build_scheduler(optimizer, "cosine", args.ft_epochs, len(train_loader))
        quant = {"bits": bits, "method": "kmeans",
                 "keep_first_last": recorded_keep(args.keep_first_last),
                 "teacher": os.path.abspath(args.ckpt)}
        meta = {"model": self.meta["model"], "dataset": dict(self.meta["dataset"], root=self.root),
                "args": vars(args), "quant": quant}
        log = RunLog(out, dict(vars(args), seed=seed))
        fit(model, train_loader, self.val_loader, optimizer, scheduler, supervised_loss,
            self.device, args.ft_epochs, out, meta, log)
        log.close()
        _, results = evaluate_checkpoint(os.path.join(out, "best.pt"), self.root, "test",
                                         args.batch_size, self.device)
        return results


def summarise(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "min": min(values),
            "max": max(values), "n": len(values)}


def aggregate(cells):
    """{(budget, strategy): summaries over seeds} of the finished cells."""
    groups = {}
    for cell in cells:
        groups.setdefault((cell["budget"], cell["strategy"]), []).append(cell)
    return [{"budget": budget, "strategy": strategy, "seeds": [c["seed"] for c in group],
             **{field: summarise([c[field] for c in group])
                for field in ("test_before", "test_after", "val_metric", "budget_ratio",
                              "evaluations", "seconds")}}
            for (budget, strategy), group in groups.items()]


def format_table(summary, metric_name, fp32_test, ft_epochs):
    def pm(s):
        return "-" if s is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"

    header = ["Budget", "Strategy", "Seeds", "Evaluations", "Search time (s)", "Budget used (%)",
              f"Test {metric_name}, no FT", f"Test {metric_name}, FT {ft_epochs} ep"]
    rows = [[f"{row['budget']:g}", LABELS[row["strategy"]], row["test_before"]["n"],
             f"{row['evaluations']['mean']:.0f}", f"{row['seconds']['mean']:.1f}",
             percent(row["budget_ratio"]["mean"]), pm(row["test_before"]), pm(row["test_after"])]
            for row in summary]
    return (markdown_table(header, rows) + f"\n\nfp32 on test: {metric_name} {percent(fp32_test)}; "
            "mean ± sample std over seeds, in %.")


def check_args(args):
    """What the flags' types cannot check alone (each flag's range is its argparse type)."""
    if args.warmup > args.evaluations:
        raise ValueError(f"--warmup {args.warmup} is above --evaluations {args.evaluations}")
    if args.min_bit > args.max_bit:
        raise ValueError(f"--min-bit {args.min_bit} is above --max-bit {args.max_bit}")


def main(args):
    check_args(args)
    device = resolve_device(args.device)
    heap.keep_freed_memory(device)  # each step's large temporaries reused, not re-faulted
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))),
                                   "compare")
    os.makedirs(out, exist_ok=True)
    meta, fp32, _ = load_checkpoint(args.ckpt)
    if meta.get("quant"):
        raise SystemExit(f"{args.ckpt}: already quantized; compare from the fp32 checkpoint")
    data = meta["dataset"]
    root = args.data_root or recorded_data_root(args.ckpt, meta)
    held_out = load_split(data["name"], root, "val", data["num_points"])
    check_same_data(args.ckpt, data, held_out, root)  # as search.py
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(args.val_seed))
    fp32.to(device)
    evaluator = PolicyEvaluator(fp32, held_out, cached_batches(
        held_out, order[:args.val_size].tolist(), args.batch_size, device), device)
    counter = CountingEvaluator(evaluator)
    # as search.py: the layers the forward calls are the steps and the budget
    layers = called_layers(list_quantizable(fp32, example_inputs(held_out, device)),
                           "lib.haq.compare")
    keep = parse_keep(args.keep_first_last)
    fixed = {} if keep == "off" else keep_first_last({}, layers, keep)
    widths = range(args.min_bit, args.max_bit + 1)
    metric_fp32 = evaluator.score(fp32)[evaluator.key]

    start = time.perf_counter()
    warm_kmeans(evaluator, layers, widths)
    print(f"k-means for {len(layers)} layers x {len(widths)} widths: "
          f"{time.perf_counter() - start:.1f} s (outside every strategy's time)", flush=True)
    envs = {budget: QuantEnv(layers, counter, metric_fp32, budget, args.min_bit, args.max_bit, fixed)
            for budget in args.budgets}
    drops = None
    if "sensitivity" in args.strategies:
        calls, start = counter.calls, time.perf_counter()
        drops = {"drops": strategies.measure_sensitivity(envs[args.budgets[0]], widths)}
        drops.update(seconds=time.perf_counter() - start, evaluations=counter.calls - calls)
        print(f"sensitivity: {drops['evaluations']} evaluations in {drops['seconds']:.1f} s",
              flush=True)

    scorer = Scorer(args, meta, fp32, evaluator, device)
    fp32_test = scorer.test(fp32)[evaluator.key]
    cells = []
    for seed in args.seeds:  # seeds outermost: a cut-short run still has every cell once
        for budget in args.budgets:
            for name in args.strategies:
                torch.manual_seed(seed)
                cell = dict(run_strategy(name, envs[budget], counter, args, seed, drops),
                            budget=budget, strategy=name, seed=seed)
                run = os.path.join(out, "runs", f"{budget:g}_{name}_seed{seed}")
                os.makedirs(run, exist_ok=True)
                write_policy(os.path.join(run, "policy.json"),
                             {k: cell[k] for k in ("bits", "val_metric", "budget_ratio", "strategy",
                                                    "seed", "budget")})
                before = scorer.before_finetune(cell["bits"])
                after = scorer.after_finetune(cell["bits"], seed, run)
                cell.update(test_before=before[evaluator.key], test_after=after[evaluator.key],
                            honest_bytes=before["honest_bytes"])
                cells.append(cell)
                print(f"budget {budget:g} seed {seed} {name}: {cell['evaluations']} evaluations, "
                      f"{cell['seconds']:.1f} s, val {cell['val_metric']:.4f}, test "
                      f"{cell['test_before']:.4f} -> {cell['test_after']:.4f} after fine-tune",
                      flush=True)
                table = write_results(out, args, cells, evaluator.key, metric_fp32, fp32_test,
                                      drops)
    print(table)


def write_results(out, args, cells, metric_name, metric_fp32_val, fp32_test, drops):
    """results.json (every cell, the summaries, the settings) and results.md, rewritten after
    every cell so an interrupted comparison leaves what it finished."""
    summary = aggregate(cells)
    table = format_table(summary, metric_name, fp32_test, args.ft_epochs)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    record = {"args": vars(args), "metric": metric_name, "fp32_val": metric_fp32_val,
              "fp32_test": fp32_test, "summary": summary, "cells": cells,
              "sensitivity": drops}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    return table


if __name__ == "__main__":
    run_script(main, get_args_parser())
