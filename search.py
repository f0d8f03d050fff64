"""HAQ search (Wang et al., CVPR 2019): a DDPG agent picks a bit width per layer of an fp32
checkpoint under a model-size budget, rewarded by the quantized model's metric on a held-out
subset of the training data after HAQ's short fine-tune. Writes policy.json (best policy),
policy.png, episodes.jsonl, tensorboard events, search_state.pt (for --resume) and a baseline
table.

    python search.py --ckpt checkpoints/demo/pretrain/best.pt --preserve-ratio 0.1 --episodes 100
    torchrun --nproc-per-node 4 search.py ...   # each reward's subset shared by 4 processes
"""
import argparse
import json
import os

import torch
from tqdm import tqdm

from lib import distributed
from lib.checkpoint import load_checkpoint, torch_load, torch_save_atomic
from lib.cli import resolve_device, run_script
from lib.experiment import example_inputs, load_split
from lib.haq.ddpg import DDPG
from lib.haq.env import QuantEnv
from lib.haq.plot import plot_policy
from lib.haq.policy_eval import (FINETUNE_LR, PolicyEvaluator, finetune_batches,
                                 haq_finetune_steps, reward_batches)
from lib.haq.search_loop import run_search
from lib.policy_file import parse_keep, write_policy
from lib.quant import keep_first_last, list_quantizable, uniform_policy
from lib.quant.size import budget_ratio, honest_size_bytes
from lib.report import format_baseline_table
from lib.runlog import RunLog


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="fp32 checkpoint (pretrain.py)")
    p.add_argument("--preserve-ratio", type=float, default=0.1,
                   help="budget: this fraction of the fp32 weight bits")
    p.add_argument("--min-bit", type=int, default=2)
    p.add_argument("--max-bit", type=int, default=8)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--warmup", type=int, default=20,
                   help="episodes of random actions first (20, as HAQ's code)")
    p.add_argument("--sigma-decay", type=float, default=0.99,
                   help="exploration decay per episode after the warm-up (HAQ: 0.99 over 600 "
                        "episodes; a short search needs a faster decay to exploit what it learnt)")
    p.add_argument("--val-size", type=int, default=200,
                   help="held-out training samples the reward is measured on")
    p.add_argument("--keep-first-last", default="",
                   help="keep the first layer and the final classifier at BITS or fp32, outside the search")
    p.add_argument("--method", default="kmeans", choices=["kmeans", "linear"])
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="SGD steps of HAQ's short fine-tune of each candidate before its reward "
                        "(default: HAQ's length, one pass over 2 x --val-size training samples; "
                        "0 = none)")
    p.add_argument("--finetune-lr", type=float, default=FINETUNE_LR,
                   help="learning rate of that fine-tune (HAQ: 1e-3)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="batch of the reward's evaluation (16: at 32 the default PT's neighbour "
                        "tensors pass glibc's 32 MiB mmap threshold and fault in every episode)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="search folder (default: <ckpt folder>/search)")
    p.add_argument("--resume", action="store_true",
                   help="continue the search saved in --out/search_state.pt")
    return p


def build_evaluator(args, device):
    meta, model, _ = load_checkpoint(args.ckpt)
    if meta.get("quant"):
        raise SystemExit(f"{args.ckpt}: already quantized; search from the fp32 checkpoint")
    data = meta["dataset"]
    root = args.data_root or data["root"]
    # The reward never sees the test split: it is measured on held-out training data.
    held_out = load_split(data["name"], root, "val", data["num_points"], seed=args.seed)
    eval_batches = reward_batches(held_out, args.val_size, args.batch_size, device, args.seed)
    if args.finetune_steps is None:
        args.finetune_steps = haq_finetune_steps(min(args.val_size, len(held_out)), args.batch_size)
    train_batches = ()
    if args.finetune_steps:
        train = load_split(data["name"], root, "train", data["num_points"], seed=args.seed)
        train_batches = finetune_batches(train, args.finetune_steps, args.batch_size, device,
                                         args.seed)
    model.to(device)
    layers = list_quantizable(model, example_inputs(held_out, device))
    evaluator = PolicyEvaluator(model, held_out, eval_batches, device, args.method, train_batches,
                                args.finetune_steps, args.finetune_lr)
    return meta, layers, evaluator


def fixed_bits_of(args, layers):
    keep = parse_keep(args.keep_first_last)
    if keep == "off":
        return {}
    return keep_first_last({}, layers, keep)


def describe(evaluator, bits):
    model = evaluator.quantized(bits)
    return {"budget_ratio": budget_ratio(model), "honest_bytes": honest_size_bytes(model)}


def baselines(args, evaluator, layers, fixed, searched):
    """Uniform policies within the searched budget, scored the same way as the search's."""
    rows = [dict(name="searched (HAQ)", method=args.method, metric=searched["metric"],
                 **describe(evaluator, searched["bits"]))]
    for method in ("linear", "kmeans"):
        for bits in range(args.min_bit, args.max_bit + 1):
            policy = dict(uniform_policy(layers, bits), **fixed)
            size = describe(evaluator, policy)
            if size["budget_ratio"] > args.preserve_ratio + 1e-9:
                continue
            evaluator.method = method
            metric = evaluator(policy)
            rows.append(dict(name=f"uniform {bits}-bit", method=method, metric=metric, **size))
    evaluator.method = args.method
    return rows


def main(args):
    # Under torchrun every rank scores a share of each reward's subset; rank 0 runs the agent,
    # broadcasts each policy and writes every file.
    _, _, device = distributed.init_distributed(resolve_device(args.device))
    main_rank = distributed.is_main()
    print_main = print if main_rank else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "search")
    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, "search_state.pt")
    state = None
    if args.resume:
        state = torch_load(state_path)
        print_main(f"resuming the search at episode {state['episode']} of {args.episodes}")

    meta, layers, evaluator = build_evaluator(args, device)
    fixed = fixed_bits_of(args, layers)
    metric_fp32 = evaluator.score(evaluator.fp32_model)[evaluator.key]
    env = QuantEnv(layers, evaluator, metric_fp32, args.preserve_ratio, args.min_bit,
                   args.max_bit, fixed)
    agent = DDPG(env.state_dim, buffer_size=128 * len(env), seed=args.seed,
                 sigma_decay=args.sigma_decay)
    print_main(f"{len(layers)} quantizable layers ({len(env)} searched, {len(fixed)} fixed); "
               f"fp32 {evaluator.key} {metric_fp32:.4f} on "
               f"{min(args.val_size, len(evaluator.dataset))} held-out training samples; "
               f"fine-tune {args.finetune_steps} steps before each reward")

    log = RunLog(out, vars(args), log_name="episodes.jsonl")
    start = state["episode"] if state else 0
    bar = tqdm(total=args.episodes, initial=start, desc="search", dynamic_ncols=True,
               disable=not main_rank)

    def on_episode(record, search_state):
        torch_save_atomic(search_state, state_path)
        log.record(record)
        log.scalars("search", {k: record[k] for k in ("reward", "metric", "budget_ratio")},
                    record["episode"])
        log.scalars("search_best", {"reward": search_state["best"]["reward"]}, record["episode"])
        bits = [b for b in record["bits"].values() if b is not None]
        bar.set_postfix(ratio=f"{record['budget_ratio']:.3f}", metric=f"{record['metric']:.4f}",
                        reward=f"{record['reward']:+.4f}",
                        best=f"{search_state['best']['metric']:.4f}")
        bar.write(f"episode {record['episode']:4d}  bits {bits}  ratio {record['budget_ratio']:.3f}  "
                  f"{evaluator.key} {record['metric']:.4f}  reward {record['reward']:+.5f}")
        bar.update(1)

    if main_rank:
        best = run_search(env, agent, args.episodes, args.warmup, on_episode, state)["best"]
    else:
        for _ in range(start, args.episodes):
            evaluator({})  # scores the policy rank 0 broadcasts
        best = None
    bar.close()
    best = distributed.broadcast_object(best)
    policy = dict(bits=best["bits"], metric=best["metric"], metric_fp32=metric_fp32,
                  metric_name=evaluator.key, episode=best["episode"], reward=best["reward"],
                  preserve_ratio=args.preserve_ratio, min_bit=args.min_bit, max_bit=args.max_bit,
                  keep_first_last=args.keep_first_last or None, method=args.method,
                  checkpoint=os.path.abspath(args.ckpt), **describe(evaluator, best["bits"]))
    if main_rank:
        write_policy(os.path.join(out, "policy.json"), policy)
        plot_policy(os.path.join(out, "policy.png"), [layer.name for layer in layers],
                    [best["bits"][layer.name] for layer in layers],
                    [layer.n_weights for layer in layers], fixed_names=tuple(fixed),
                    title=f"HAQ policy, preserve {args.preserve_ratio}")

    rows = baselines(args, evaluator, layers, fixed, best)
    table = format_baseline_table(rows, evaluator.key, metric_fp32)
    if main_rank:
        with open(os.path.join(out, "baselines.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out, "baselines.json"), "w") as f:
            json.dump(rows, f, indent=2)
    log.close()
    distributed.cleanup()
    print_main(table)
    print_main(f"best policy (episode {best['episode']}) in {out}/policy.json, chart in {out}/policy.png")


if __name__ == "__main__":
    run_script(main, get_args_parser())
