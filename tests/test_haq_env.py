"""HAQ environment: action -> bit mapping, budget squeeze, fixed layers, state features, reward."""
import itertools
import random
from types import SimpleNamespace

import pytest
import torch

from lib.haq.ddpg import DDPG
from lib.haq.env import QuantEnv, action_to_bit, fit_budget
from lib.haq.search_loop import run_search


def make_layer(name, n_weights, kind="linear", in_features=8, out_features=8, kernel_size=1, stride=1,
               input_size=1024):
    return SimpleNamespace(name=name, kind=kind, in_features=in_features, out_features=out_features,
                           kernel_size=kernel_size, stride=stride, n_weights=n_weights, input_size=input_size)


def reference_squeeze(bits, n_weights, budget_bits, min_bit):
    """The final action wall written as a plain cycle over layers last -> first, for comparison."""
    bits = list(bits)
    order = itertools.cycle(reversed(range(len(bits))))
    while sum(n * b for n, b in zip(n_weights, bits)) > budget_bits and any(b > min_bit for b in bits):
        i = next(order)
        if bits[i] > min_bit:
            bits[i] -= 1
    return bits


@pytest.mark.parametrize("min_bit,max_bit", [(2, 8), (1, 8), (4, 4), (3, 6)])
def test_action_to_bit_edges_and_equal_bins(min_bit, max_bit):
    assert action_to_bit(0.0, min_bit, max_bit) == min_bit
    assert action_to_bit(1.0, min_bit, max_bit) == max_bit
    grid = [i / 7000 for i in range(7001)]
    bits = [action_to_bit(a, min_bit, max_bit) for a in grid]
    assert bits == sorted(bits)  # monotone in the action
    counts = {b: bits.count(b) for b in range(min_bit, max_bit + 1)}
    assert set(bits) == set(counts)  # every width reachable, nothing outside the range
    width = len(grid) / len(counts)
    assert all(abs(c - width) <= 2 for c in counts.values())  # equal-width bins


def test_action_to_bit_bin_edges():
    # 7 bins of width 1/7 for 2..8 bits: a just below 1/7 is 2 bits, at 1/7 it is 3
    assert action_to_bit(1 / 7 - 1e-9, 2, 8) == 2
    assert action_to_bit(1 / 7 + 1e-9, 2, 8) == 3
    assert action_to_bit(6 / 7 + 1e-9, 2, 8) == 8


def test_fit_budget_takes_from_last_layer_first():
    n = [100, 100, 100]
    assert fit_budget([8, 8, 8], n, 2200, 2) == [8, 7, 7]
    assert fit_budget([8, 8, 8], n, 1900, 2) == [7, 6, 6]  # a second pass starts at the last layer again
    assert fit_budget([8, 2, 8], n, 1500, 2) == [7, 2, 6]  # layers at min_bit are skipped
    assert fit_budget([5, 5, 5], n, 1500, 2) == [5, 5, 5]  # fits: untouched
    assert fit_budget([5, 5, 5], n, 100, 2) == [2, 2, 2]  # cannot fit: stops at min_bit


def test_fit_budget_matches_reference_on_random_policies():
    rng = random.Random(0)
    for _ in range(500):
        count = rng.randint(1, 8)
        n = [rng.randint(1, 5000) for _ in range(count)]
        bits = [rng.randint(2, 8) for _ in range(count)]
        budget = rng.uniform(0.5, 9) * sum(n)
        assert fit_budget(bits, n, budget, 2) == reference_squeeze(bits, n, budget, 2)


def run_episode(env, actions):
    state = env.reset()
    states, rewards = [state], []
    for a in actions:
        state, reward, done, info = env.step(a)
        states.append(state)
        rewards.append(reward)
    assert done
    return states, rewards, info


def test_every_evaluated_policy_meets_budget_and_range():
    """Budget property over random models, budgets, fixed layers and action sequences."""
    rng = random.Random(1)
    for _ in range(200):
        count = rng.randint(2, 9)
        layers = [make_layer(f"block{i}.fc", rng.choice([64, 300, 1024, 4096, 20000])) for i in range(count)]
        fixed = {}
        for layer in rng.sample(layers, rng.randint(0, min(2, count - 1))):
            fixed[layer.name] = rng.choice([None, 8, 4])
        min_bit, max_bit = rng.choice([(2, 8), (1, 6), (3, 8)])
        total = sum(l.n_weights for l in layers)
        fixed_cost = sum(l.n_weights * (32 if fixed[l.name] is None else fixed[l.name])
                         for l in layers if l.name in fixed)
        floor = (fixed_cost + min_bit * sum(l.n_weights for l in layers if l.name not in fixed)) / (32 * total)
        if floor > 1:
            continue
        ratio = rng.uniform(floor, min(1.0, floor + 0.15))
        evaluated = []

        def evaluate(bits):
            evaluated.append(dict(bits))
            return 0.7

        env = QuantEnv(layers, evaluate, 0.75, ratio, min_bit, max_bit, fixed)
        assert len(env) == count - len(fixed)
        actions = [rng.random() for _ in range(len(env))]
        _, _, info = run_episode(env, actions)

        assert len(evaluated) == 1 and evaluated[0] == info["bits"]
        bits = info["bits"]
        assert list(bits) == [l.name for l in layers]
        used = 0
        for layer in layers:
            if layer.name in fixed:
                assert bits[layer.name] == fixed[layer.name]
                used += layer.n_weights * (32 if fixed[layer.name] is None else fixed[layer.name])
            else:
                assert min_bit <= bits[layer.name] <= max_bit
                used += layer.n_weights * bits[layer.name]
        assert used <= ratio * 32 * total + 1e-6
        assert info["budget_ratio"] == pytest.approx(used / (32 * total))
        searched = [l for l in layers if l.name not in fixed]
        raw = [action_to_bit(a, min_bit, max_bit) for a in actions]
        assert [bits[l.name] for l in searched] == reference_squeeze(
            raw, [l.n_weights for l in searched], ratio * 32 * total - fixed_cost, min_bit)


def test_infeasible_budget_is_refused_at_construction():
    layers = [make_layer("a", 1000), make_layer("b", 1000)]
    with pytest.raises(ValueError, match="infeasible"):
        QuantEnv(layers, lambda bits: 0.0, 0.0, preserve_ratio=1.9 / 32, min_bit=2)
    QuantEnv(layers, lambda bits: 0.0, 0.0, preserve_ratio=2 / 32, min_bit=2)  # exactly min_bit fits
    # fp32 layer "a" alone takes half the model's fp32 size
    with pytest.raises(ValueError, match="infeasible"):
        QuantEnv(layers, lambda bits: 0.0, 0.0, preserve_ratio=0.5, fixed_bits={"a": None})
    with pytest.raises(ValueError, match="unknown layers"):
        QuantEnv(layers, lambda bits: 0.0, 0.0, preserve_ratio=0.5, fixed_bits={"c": 8})
    with pytest.raises(ValueError, match="nothing to search"):
        QuantEnv(layers, lambda bits: 0.0, 0.0, preserve_ratio=0.5, fixed_bits={"a": 8, "b": 8})


def test_fixed_layers_are_not_steps_but_count_in_budget():
    layers = [make_layer("first", 100), make_layer("mid1", 1000), make_layer("mid2", 1000),
              make_layer("head", 200)]
    seen = []
    env = QuantEnv(layers, lambda bits: seen.append(bits) or 0.5, 0.5, preserve_ratio=0.25,
                   fixed_bits={"first": None, "head": 8})
    assert len(env) == 2
    # budget 0.25 * 32 * 2300 = 18400 bits; fixed take 3200 + 1600, searched get 13600:
    # 8 + 8 -> (8, 7) -> (7, 7) -> (7, 6)
    _, rewards, info = run_episode(env, [1.0, 1.0])
    assert info["bits"] == {"first": None, "mid1": 7, "mid2": 6, "head": 8}
    assert info["budget_ratio"] == pytest.approx((3200 + 7000 + 6000 + 1600) / (32 * 2300))
    assert rewards == [0.0, 0.0]  # metric equals fp32: no loss


def test_state_features_and_reward():
    layers = [make_layer("conv0", 192, kind="conv1d", in_features=3, out_features=64, input_size=2048),
              make_layer("fc1", 4096, in_features=64, out_features=64, input_size=512),
              make_layer("fc2", 4096, in_features=64, out_features=64, input_size=512),
              make_layer("cls", 640, in_features=64, out_features=10, input_size=1)]
    env = QuantEnv(layers, lambda bits: 0.6, 0.8, preserve_ratio=0.2, fixed_bits={"cls": 8})
    assert env.state_dim == 9
    states, rewards, info = run_episode(env, [0.9, 0.3, 0.6])
    feats = torch.stack(states[:3])  # (L, 9)
    assert feats.min() >= 0 and feats.max() <= 1
    # columns: index, in, out, kernel, stride, #weights, input size, conv flag, previous action
    assert feats[:, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])  # model positions 0, 1, 2
    assert feats[:, 1].tolist() == pytest.approx([0.0, 1.0, 1.0])
    assert feats[:, 2].tolist() == [0.0, 0.0, 0.0]  # constant column -> 0
    assert feats[:, 3].tolist() == [0.0, 0.0, 0.0]
    assert feats[:, 7].tolist() == [1.0, 0.0, 0.0]
    assert feats[:, 8].tolist() == pytest.approx([0.0, 0.9, 0.3])  # previous action, 0 for the first
    assert rewards[:2] == [0.0, 0.0]
    assert rewards[2] == pytest.approx(0.1 * (0.6 - 0.8))
    assert info["metric"] == 0.6
    assert info["actions"] == [0.9, 0.3, 0.6]


def test_step_needs_reset_and_a_number():
    env = QuantEnv([make_layer("a", 10)], lambda bits: 0.0, 0.0, preserve_ratio=0.5)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0.5)
    env.reset()
    with pytest.raises(ValueError, match="NaN"):
        env.step(float("nan"))
    env.reset()
    env.step(0.5)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0.5)


def test_a_non_finite_metric_stops_the_search_instead_of_becoming_its_best():
    """A NaN reward wins against nothing and loses against nothing: as the first episode's it
    stayed the best policy for good, and once in the replay buffer it made the agent's baseline,
    critic and actor NaN, whose exploration draws were then rejected forever (a hang)."""
    layers = [make_layer("a", 1000), make_layer("b", 1000)]
    scores = iter([float("nan"), 0.7, 0.8])
    env = QuantEnv(layers, lambda bits: next(scores), 0.8, preserve_ratio=0.25)
    with pytest.raises(FloatingPointError, match=r"widths \[.*\] scored nan; search stopped"):
        run_search(env, DDPG(env.state_dim, buffer_size=64, seed=0), episodes=3, warmup=3)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match="fp32 model's metric"):
            QuantEnv(layers, lambda bits: 0.7, bad, preserve_ratio=0.25)
