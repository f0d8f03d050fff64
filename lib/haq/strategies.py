"""Ways to choose a bit policy under HAQ's budget, to set beside HAQ's DDPG agent: random search,
a sensitivity-guided allocation (per-layer drops + an exact knapsack), and the uniform width.

Every strategy works on a QuantEnv and scores candidates only through its `evaluate_policy` (the
search's reward data, never test), so a counting evaluator measures what each one costs. The
first three return the record of the policy they pick: bits (the complete policy, fixed layers
included), budget_ratio and metric on the env's data.
"""
import math

import numpy as np

from lib.haq.ddpg import DDPG
from lib.haq.env import FP32_BITS
from lib.haq.search_loop import run_search


def ddpg_search(env, episodes, warmup, seed=0, sigma_decay=0.99):
    """HAQ's agent as search.py runs it: `episodes` evaluations, the first `warmup` random."""
    agent = DDPG(env.state_dim, buffer_size=128 * len(env), seed=seed, sigma_decay=sigma_decay)
    return run_search(env, agent, episodes, warmup)["best"]


def random_search(env, episodes, seed=0):
    """The best of `episodes` policies drawn as HAQ's warm-up draws them: a ~ U[0, 1] per layer,
    binned to bits and squeezed into the budget by the env (fit_budget), exactly like the agent's
    first episodes. Only the agent's random generator is used; it never learns."""
    agent = DDPG(env.state_dim, buffer_size=len(env), seed=seed)
    return run_search(env, agent, episodes, warmup=episodes)["best"]


def _policy(env, searched_bits):
    """The complete policy: searched layers from `searched_bits` (name -> bits, missing = fp32),
    fixed layers at their fixed widths."""
    return {name: env.fixed_bits[name] if name in env.fixed_bits else searched_bits.get(name)
            for name in env.layer_names}


def _record(env, searched_bits):
    """Evaluates a complete policy once and describes it like a search episode."""
    bits = _policy(env, searched_bits)
    used = env.fixed_cost + sum(n * bits[layer.name] for n, layer in zip(env.n_weights, env.searched))
    return {"bits": bits, "budget_ratio": used / (FP32_BITS * env.total_weights),
            "metric": float(env.evaluate_policy(dict(bits)))}


def measure_sensitivity(env, bit_widths):
    """{layer name: {bits: metric drop}}: each searched layer alone at each width, every other
    searched layer fp32 and the fixed layers at their widths; drop = metric_fp32 - metric.
    Costs len(env) * len(bit_widths) evaluations."""
    drops = {}
    for layer in env.searched:
        drops[layer.name] = {b: env.metric_fp32 - float(env.evaluate_policy(_policy(env, {layer.name: b})))
                             for b in bit_widths}
    return drops


def best_allocation(costs, drops, capacity):
    """Exact multiple-choice knapsack: one option per layer minimising sum_l drops[l][j] subject to
    sum_l costs[l][j] <= capacity (non-negative integers). Returns the chosen option per layer.

    Dynamic programme over the spent capacity, divided by the gcd of all costs first. best[c] is
    the least total drop of the layers so far within capacity c, so it never rises with c; a tie
    keeps the earlier option (list the cheaper options first to get the smaller model)."""
    if capacity < 0:
        raise ValueError(f"knapsack: capacity {capacity} is negative")
    unit = math.gcd(*(int(c) for layer_costs in costs for c in layer_costs)) or 1
    size = int(capacity) // unit + 1
    best = np.zeros(size)
    choices = []
    for layer_costs, layer_drops in zip(costs, drops):
        new = np.full(size, np.inf)
        choice = np.zeros(size, dtype=np.int8)
        for j, (cost, drop) in enumerate(zip(layer_costs, layer_drops)):
            step = int(cost) // unit
            if step >= size:
                continue  # never fits
            candidate = np.full(size, np.inf)
            candidate[step:] = best[:size - step] + drop
            better = candidate < new
            new[better], choice[better] = candidate[better], j
        best = new
        choices.append(choice)
    if not np.isfinite(best[-1]):
        raise ValueError(f"knapsack: capacity {capacity} cannot hold every layer's cheapest option")
    picks, c = [], size - 1
    for layer_costs, choice in zip(reversed(costs), reversed(choices)):
        j = int(choice[c])
        picks.append(j)
        c -= int(layer_costs[j]) // unit
    return picks[::-1]


def sensitivity_allocation(env, drops):
    """The policy minimising the sum of the measured drops (the additive proxy) within the env's
    budget, fixed layers charged first: exact for that proxy."""
    widths = [sorted(drops[layer.name]) for layer in env.searched]
    low = [w[0] for w in widths]
    # Costs above each layer's lowest width keep the programme small; that base is always spent.
    base = sum(n * b for n, b in zip(env.n_weights, low))
    capacity = math.floor(env.budget_bits - env.fixed_cost - base + 1e-9)
    costs = [[n * (b - lo) for b in w] for n, w, lo in zip(env.n_weights, widths, low)]
    values = [[drops[layer.name][b] for b in w] for layer, w in zip(env.searched, widths)]
    picks = best_allocation(costs, values, capacity)
    return _record(env, {layer.name: w[j] for layer, w, j in zip(env.searched, widths, picks)})


def uniform_within_budget(env, bit_widths):
    """Every searched layer at the largest width of `bit_widths` that fits the budget beside the
    fixed layers; scored once on the env's data."""
    room = env.budget_bits - env.fixed_cost
    fitting = [b for b in bit_widths if b * sum(env.n_weights) <= room + 1e-9]
    if not fitting:
        raise ValueError(f"uniform policy: no width in {list(bit_widths)} fits the budget")
    return _record(env, {layer.name: max(fitting) for layer in env.searched})
