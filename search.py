"""HAQ search (Wang et al., CVPR 2019): a DDPG agent picks a bit width per layer of an fp32
checkpoint under a model-size budget, rewarded by the quantized model's metric on a held-out
subset of the training data after HAQ's short fine-tune. Writes policy.json (best policy),
policy.png, episodes.jsonl, tensorboard events, search_state.pt (for --resume) and a baseline
table.

    python search.py --ckpt checkpoints/demo/pretrain/best.pt --preserve-ratio 0.1 --episodes 100
    torchrun --nproc-per-node 4 search.py ...   # each reward's subset shared by 4 processes

The search folder (--out) defaults to the search/ subfolder of the checkpoint's folder.
--batch-size is the reward evaluation's; keep it at 16 on a CPU: at 32 the default PT's
neighbour tensors pass glibc's 32 MiB mmap threshold and fault in every episode.
"""
import hashlib
import math
import os

import torch
from tqdm import tqdm

from lib import distributed, heap
from lib.checkpoint import (atomic_write_json, same_input_as_recorded, tensors_sha256, torch_load,
                            torch_save_atomic)
from lib.cli import (add_flags, bit_width, fraction, make_parser, nonneg_int, parse_keep,
                     path_arg, positive_float, positive_fraction, positive_int, resolve_amp,
                     resolve_device, run_script)
from lib.experiment import (check_same_data, check_training_batch, example_inputs,
                            load_on_every_rank, load_split, recorded_data_root)
from lib.haq.ddpg import DDPG
from lib.haq.env import InfeasibleBudget, QuantEnv, check_search_space
from lib.haq.plot import plot_policy, policy_figure
from lib.haq.policy_eval import (FINETUNE_LR, PolicyEvaluator, finetune_batches,
                                 haq_finetune_steps, reward_batches)
from lib.haq.search_loop import run_search
from lib.policy_file import recorded_keep, write_policy
from lib.quant import called_layers, keep_first_last, list_quantizable, uniform_policy
from lib.quant.size import budget_ratio, honest_size_bytes
from lib.report import format_baseline_table
from lib.rundir import claim, run_id
from lib.runlog import RunLog


def get_args_parser():
    p = make_parser(__doc__)
    p.add_argument("--ckpt", type=path_arg, default=None,
                   help="fp32 checkpoint (pretrain.py); required for a new search")
    p.add_argument("--preserve-ratio", type=positive_fraction, default=0.1,
                   help="budget: this fraction of the fp32 weight bits")
    p.add_argument("--min-bit", type=bit_width, default=2, help="smallest bit width searched")
    p.add_argument("--max-bit", type=bit_width, default=8, help="largest bit width searched")
    p.add_argument("--episodes", type=positive_int, default=600, help="search episodes")
    p.add_argument("--warmup", type=nonneg_int, default=20,
                   help="episodes of random actions first (20, as HAQ's code)")
    p.add_argument("--sigma-decay", type=fraction, default=0.99,
                   help="exploration decay per episode after the warm-up (HAQ: 0.99 over 600 "
                        "episodes; a short search needs a faster decay to exploit what it learnt)")
    p.add_argument("--val-size", type=positive_int, default=200,
                   help="held-out training samples the reward is measured on")
    add_flags(p, "keep_first_last", "method")
    p.add_argument("--finetune-steps", type=nonneg_int, default=None,
                   help="SGD steps of HAQ's short fine-tune of each candidate before its reward "
                        "(None: HAQ's length, one pass over 2 x --val-size training samples; "
                        "0 = none)")
    p.add_argument("--finetune-lr", type=positive_float, default=FINETUNE_LR,
                   help="learning rate of that fine-tune (HAQ: 1e-3)")
    add_flags(p, "data_root", "batch_size", "device", "seed", "workers", "amp", "out", "resume",
              "overwrite")
    return p


def build_evaluator(args, device, meta, model):
    """The reward of a policy for the fp32 `model` of --ckpt (`meta` its record)."""
    if meta.get("quant"):
        raise ValueError(f"{args.ckpt}: already quantized; search from the fp32 checkpoint")
    data = meta["dataset"]
    root = args.data_root or recorded_data_root(args.ckpt, meta)
    # The reward never sees the test split: it is measured on held-out training data.
    held_out = load_split(data["name"], root, "val", data["num_points"], seed=args.seed)
    # another label space or other point features would reward every policy on wrong inputs
    check_same_data(args.ckpt, data, held_out, root)
    model.to(device)
    # the search's steps and budget: the layers the forward calls, in its order
    layers = called_layers(list_quantizable(model, example_inputs(held_out, device)), "search.py")
    # an impossible budget or widths stop here, before the batches and the fp32 score
    check_budget(args, layers)
    eval_batches = reward_batches(held_out, args.val_size, args.batch_size, device, args.seed,
                                  args.workers)
    if args.finetune_steps is None:
        args.finetune_steps = haq_finetune_steps(min(args.val_size, len(held_out)), args.batch_size)
    train_batches = ()
    if args.finetune_steps:
        check_training_batch(held_out.task, args.batch_size)  # each process fine-tunes alone
        train = load_split(data["name"], root, "train", data["num_points"], seed=args.seed)
        train_batches = finetune_batches(train, args.finetune_steps, args.batch_size, device,
                                         args.seed, args.workers)
    evaluator = PolicyEvaluator(model, held_out, eval_batches, device, args.method, train_batches,
                                args.finetune_steps, args.finetune_lr, amp=args.amp,
                                seed=args.seed)
    return layers, evaluator


def reward_data_sha256(evaluator):
    """SHA-256 of the samples every reward is measured on, the same under any number of
    processes: the scored batches in their order (rank r holds batches r, r + world, ...) and
    the fine-tune's (the same on every rank). A search resumed on a data folder whose contents
    changed (--data-root is compared as a path) would mix rewards of two sets of samples."""
    shares = distributed.gather_objects([_batch_sha256(b) for b in evaluator.eval_batches])
    world = len(shares)
    scored = [shares[g % world][g // world] for g in range(sum(map(len, shares)))]
    fine_tune = [_batch_sha256(batch) for batch in evaluator.train_batches]
    return hashlib.sha256("".join(scored + fine_tune).encode()).hexdigest()


def _batch_sha256(batch):
    return tensors_sha256((key, batch[key]) for key in sorted(batch) if torch.is_tensor(batch[key]))


def check_budget(args, layers):
    """lib.haq.env.check_search_space, with a budget below the smallest policy the search can
    make (every searched layer at --min-bit, the kept layers at their width) told in the flags
    that set it, and the least --preserve-ratio that holds it (rounded up to 4 decimals)."""
    try:
        check_search_space(layers, args.preserve_ratio, args.min_bit, args.max_bit,
                           fixed_bits_of(args, layers))
    except InfeasibleBudget as e:
        keep = parse_keep(args.keep_first_last)
        smallest = f"every searched layer at --min-bit {args.min_bit}"
        if keep != "off":
            smallest += f", the first and last layers at --keep-first-last {args.keep_first_last}"
        lower = [flag for flag, can in (("--min-bit", args.min_bit > 1),
                                        ("--keep-first-last", keep not in ("off", 1))) if can]
        raise ValueError(
            f"--preserve-ratio {args.preserve_ratio} is unreachable: the smallest policy "
            f"({smallest}) takes {e.least_ratio:.4g} of the fp32 weight bits; give "
            f"--preserve-ratio {math.ceil(e.least_ratio * 1e4) / 1e4:g} or more"
            f"{', or a lower ' + ' or '.join(lower) if lower else ''}") from None


def fixed_bits_of(args, layers):
    keep = parse_keep(args.keep_first_last)
    if keep == "off":
        return {}
    return keep_first_last({}, layers, keep)


def describe(evaluator, layers, bits):
    """The budget ratio over the searched and kept `layers` (the env's; a layer the forward never
    calls is not charged), and the honest size of the whole quantized model."""
    model = evaluator.quantized(bits)
    return {"budget_ratio": budget_ratio(layers, bits), "honest_bytes": honest_size_bytes(model)}


def baselines(args, evaluator, layers, fixed, searched):
    """Uniform policies within the searched budget, scored the same way as the search's."""
    rows = [dict(name="searched (HAQ)", method=args.method, metric=searched["metric"],
                 **describe(evaluator, layers, searched["bits"]))]
    for method in ("linear", "kmeans"):
        evaluator.method = method  # before describe(): the sizes are this method's codebooks'
        for bits in range(args.min_bit, args.max_bit + 1):
            policy = dict(uniform_policy(layers, bits), **fixed)
            size = describe(evaluator, layers, policy)
            if size["budget_ratio"] > args.preserve_ratio + 1e-9:
                continue
            metric = evaluator(policy)
            rows.append(dict(name=f"uniform {bits}-bit", method=method, metric=metric, **size))
    evaluator.method = args.method
    return rows


def main(args):
    if not args.ckpt:
        raise ValueError("give --ckpt (an fp32 checkpoint from pretrain.py)")
    if args.min_bit > args.max_bit:
        raise ValueError(f"--min-bit {args.min_bit} is above --max-bit {args.max_bit}")
    # Under torchrun every rank scores a share of each reward's subset; rank 0 runs the agent,
    # broadcasts each policy and writes every file.
    _, _, device = distributed.init_distributed(resolve_device(args.device))
    args.amp = resolve_amp(args.amp, device)
    heap.keep_freed_memory(device)  # each step's large temporaries reused, not re-faulted
    main_rank = distributed.is_main()
    print_main = print if main_rank else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    args.out = out = claim(args.out or os.path.join(os.path.dirname(args.ckpt), "search"),
                           resume=bool(args.resume), overwrite=args.overwrite,
                           inputs=[("--ckpt", args.ckpt)])
    state_path = os.path.join(out, "search_state.pt")
    state = None
    if args.resume:
        state = torch_load(args.resume)
        print_main(f"resuming the search at episode {state['episode']} of {args.episodes}")
    args.run_id = run_id(state["args"] if state else None)  # lib/rundir.check_one_search
    # every rank searches the same model, and the SHA-256 recorded is the one of the bytes read
    meta, model, _, ckpt_sha256 = load_on_every_rank(args.ckpt)
    if state:  # the replay buffer's rewards were measured against that model
        same_input_as_recorded(args.ckpt, state.get("ckpt_sha256"), "--ckpt", ckpt_sha256)

    layers, evaluator = build_evaluator(args, device, meta, model)
    data_sha256 = reward_data_sha256(evaluator)
    if state and state.get("data_sha256", data_sha256) != data_sha256:
        raise ValueError(f"{args.resume}: the samples its rewards are measured on changed since "
                         f"the search started (the data at "
                         f"{args.data_root or recorded_data_root(args.ckpt, meta)}); resume it on the data it "
                         f"searched on, or start a new search")
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
    log.keep_records(start)
    if state:
        log.purge_from(start)  # points of the episodes past the state, which run again
    bar = tqdm(total=args.episodes, initial=start, desc="search", dynamic_ncols=True,
               disable=not main_rank)
    names = [layer.name for layer in layers]

    def on_episode(record, search_state):
        # The log line and the tensorboard points first, written out: a crash before the state
        # lands leaves them one episode ahead, which the resume drops (keep_records, purge_from);
        # the other order would lose them.
        log.record(record)
        log.scalars("search", {k: record[k] for k in ("reward", "metric", "budget_ratio")},
                    record["episode"])
        log.scalars("search_best", {k: search_state["best"][k] for k in ("reward", "metric")},
                    record["episode"])
        log.scalars("search_bits", record["bits"], record["episode"])
        if search_state["best"]["episode"] == record["episode"]:  # a new best policy: draw it
            log.figure("search_best/policy", policy_figure(
                names, [record["bits"][n] for n in names], [layer.n_weights for layer in layers],
                fixed_names=tuple(fixed), title=f"best policy at episode {record['episode']}"),
                record["episode"])
        log.flush_events()
        torch_save_atomic(dict(search_state, args=vars(args), ckpt_sha256=ckpt_sha256,
                               data_sha256=data_sha256), state_path)
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
                  keep_first_last=recorded_keep(args.keep_first_last), method=args.method,
                  checkpoint=os.path.abspath(args.ckpt), checkpoint_sha256=ckpt_sha256,
                  **describe(evaluator, layers, best["bits"]))
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
        # written last, atomically: its presence says the run ended (lib/stage_status.py)
        atomic_write_json(os.path.join(out, "baselines.json"), rows)
    print_main(table)
    print_main(f"best policy (episode {best['episode']}) in {out}/policy.json, chart in {out}/policy.png")
    log.close()  # last: log.txt copies the console until here
    distributed.cleanup()


if __name__ == "__main__":
    run_script(main, get_args_parser(), kind="search")
