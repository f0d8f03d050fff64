"""Search strategies beside HAQ's agent: the knapsack allocation is optimal (against brute force
and on a toy with a known answer), random search and DDPG pay the same number of evaluations,
the uniform width is the largest that fits, and the comparison driver runs end to end."""
import itertools
import json
import math
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lib.haq import QuantEnv, strategies
from lib.haq.compare import STRATEGIES, get_args_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force(costs, drops, capacity):
    feasible = [(sum(d[j] for d, j in zip(drops, picks)), picks)
                for picks in itertools.product(*(range(len(c)) for c in costs))
                if sum(c[j] for c, j in zip(costs, picks)) <= capacity]
    return min(feasible)[0]


def test_knapsack_matches_brute_force_on_random_problems():
    rng = random.Random(0)
    for _ in range(60):
        n_layers, n_options = rng.randint(1, 4), rng.randint(1, 4)
        costs = [sorted(rng.randint(0, 12) * rng.choice([1, 3]) for _ in range(n_options))
                 for _ in range(n_layers)]
        drops = [[rng.uniform(-0.1, 1.0) for _ in range(n_options)] for _ in range(n_layers)]
        capacity = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
        picks = strategies.best_allocation(costs, drops, capacity)
        assert sum(c[j] for c, j in zip(costs, picks)) <= capacity
        assert sum(d[j] for d, j in zip(drops, picks)) == pytest.approx(brute_force(costs, drops, capacity))


def test_knapsack_rejects_an_impossible_budget():
    with pytest.raises(ValueError, match="capacity"):
        strategies.best_allocation([[5, 6], [5]], [[0, 0], [0]], 9)
    with pytest.raises(ValueError, match="capacity"):
        strategies.best_allocation([[0, 1]], [[0, 0]], -1)


def toy_layers(sizes):
    return [SimpleNamespace(name=f"layer{i}", kind="linear", in_features=8, out_features=8,
                            kernel_size=1, stride=1, n_weights=n, input_size=64)
            for i, n in enumerate(sizes)]


def additive_metric(sensitivity, calls=None):
    """100 minus sum_l s_l 2^-b_l over the quantized layers: the proxy is exact here."""
    def metric(bits):
        if calls is not None:
            calls.append(dict(bits))
        return 100.0 - sum(sensitivity[name] * 0.5 ** b for name, b in bits.items() if b is not None)
    return metric


def test_sensitivity_allocation_finds_the_known_optimum():
    """Four layers of 1000 weights at 3 bits on average, fixed layer5 (100 weights) at 8 bits
    charged to the budget. layer0 is 64x more sensitive than the others: the best policy gives it
    the bits (6, then 2 each for the rest uses 6 + 3*2 = 12 = 4 * 3), every other split loses more
    (moving one bit from layer0 to another layer costs 64*2^-6 and saves at most 2^-2 - 2^-3)."""
    layers = toy_layers([1000, 1000, 1000, 1000, 100])
    sensitivity = {"layer0": 64.0, "layer1": 1.0, "layer2": 1.0, "layer3": 1.0, "layer4": 50.0}
    calls = []
    budget = (3 * 4000 + 8 * 100) / (32 * 4100)
    env = QuantEnv(layers, additive_metric(sensitivity, calls), 100.0, budget, min_bit=2,
                   max_bit=8, fixed_bits={"layer4": 8})
    drops = strategies.measure_sensitivity(env, range(2, 9))
    assert len(calls) == 4 * 7
    assert all(call["layer4"] == 8 for call in calls)  # fixed layer at its width while measuring
    assert drops["layer0"][2] == pytest.approx(64 * 0.25 + 50 * 2 ** -8)

    record = strategies.sensitivity_allocation(env, drops)
    assert [record["bits"][f"layer{i}"] for i in range(5)] == [6, 2, 2, 2, 8]
    assert record["budget_ratio"] <= budget + 1e-12
    # exact optimum by brute force over every policy within the budget
    best = max((additive_metric(sensitivity)(dict(zip([f"layer{i}" for i in range(4)], bits), layer4=8)), bits)
               for bits in itertools.product(range(2, 9), repeat=4)
               if sum(b * 1000 for b in bits) + 800 <= budget * 32 * 4100 + 1e-9)
    assert list(best[1]) == [6, 2, 2, 2]
    assert record["metric"] == pytest.approx(best[0])


def test_random_search_and_ddpg_pay_the_same_evaluations():
    layers = toy_layers([1024] * 6)
    sensitivity = {f"layer{i}": 64.0 if i == 0 else 1.0 for i in range(6)}
    for search in (lambda env: strategies.ddpg_search(env, 12, warmup=4, seed=1, sigma_decay=0.9),
                   lambda env: strategies.random_search(env, 12, seed=1)):
        calls = []
        env = QuantEnv(layers, additive_metric(sensitivity, calls), 100.0, preserve_ratio=3 / 32)
        record = search(env)
        assert len(calls) == 12
        assert record["budget_ratio"] <= 3 / 32 + 1e-12
        assert record["bits"] in calls  # the returned policy is one that was evaluated


def test_uniform_is_the_largest_width_beside_the_fixed_layers():
    layers = toy_layers([1000, 1000, 1000, 100])
    calls = []
    # 3 bits on average over 3100 weights; layer3 at 8 bits leaves (9300 - 800) / 3000 = 2.83 bits
    env = QuantEnv(layers, additive_metric(dict.fromkeys(["layer0", "layer1", "layer2", "layer3"], 1.0), calls),
                   100.0, 3 / 32, min_bit=1, max_bit=8, fixed_bits={"layer3": 8})
    record = strategies.uniform_within_budget(env, range(1, 9))
    assert record["bits"] == {"layer0": 2, "layer1": 2, "layer2": 2, "layer3": 8}
    assert len(calls) == 1 and math.isclose(record["budget_ratio"], 6800 / (32 * 3100))


def test_driver_runs_end_to_end(tmp_path):
    """A tiny dataset and a 1-epoch model: every strategy, two seeds, results written."""
    def run(*args):
        out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    data = tmp_path / "synthetic"
    run("-m", "lib.data.synthetic", "--out", str(data), "--only", "parts", "--train-shapes", "2",
        "--eval-shapes", "1")
    pre = str(tmp_path / "pretrain")
    run("pretrain.py", "--model", "pt_seg_tiny", "--dataset", "synthetic_parts", "--data-root",
        str(data / "parts"), "--num-points", "128", "--epochs", "1", "--batch-size", "6", "--out", pre)
    out = tmp_path / "compare"
    main(get_args_parser().parse_args([
        "--ckpt", os.path.join(pre, "best.pt"), "--out", str(out), "--budgets", "0.1",
        "--seeds", "0", "1", "--evaluations", "3", "--warmup", "2", "--min-bit", "1", "--max-bit", "2",
        "--val-size", "4", "--batch-size", "6", "--ft-epochs", "1", "--ft-samples", "6"]))
    with open(out / "results.json") as f:
        results = json.load(f)
    assert len(results["cells"]) == 2 * len(STRATEGIES)
    for cell in results["cells"]:
        assert cell["budget_ratio"] <= cell["budget"] + 1e-9
        assert 0 <= cell["test_before"] <= 1 and 0 <= cell["test_after"] <= 1
        assert os.path.isfile(out / "runs" / f"{cell['budget']:g}_{cell['strategy']}_seed{cell['seed']}" / "best.pt")
    by_name = {(c["strategy"], c["budget"], c["seed"]): c["evaluations"] for c in results["cells"]}
    assert all(by_name[("ddpg", b, s)] == by_name[("random", b, s)] == 3 for b in (0.1,) for s in (0, 1))
    assert {len(row["seeds"]) for row in results["summary"]} == {2}
    assert "sensitivity + knapsack" in (out / "results.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--min-bit", "0"], "--min-bit: 0"), (["--max-bit", "33"], "--max-bit: 33"),
    (["--budgets", "0.1", "0"], "--budgets: 0"), (["--lr", "-1"], "--lr: -1"),
    (["--batch-size", "0"], "--batch-size: 0"), (["--ft-epochs", "0"], "--ft-epochs: 0"),
])
def test_compare_refuses_an_out_of_range_flag_as_it_parses(flags, message, capsys):
    """They were plain int / float: --min-bit 0 or a budget of 0 got as far as the searches,
    after the checkpoint and the held-out split had loaded."""
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--ckpt", "x.pt", *flags])
    assert f"argument {message}" in capsys.readouterr().err


def test_compare_refuses_a_min_bit_above_the_max_bit_before_loading():
    args = get_args_parser().parse_args(["--ckpt", "missing.pt", "--min-bit", "6",
                                         "--max-bit", "4"])
    with pytest.raises(ValueError, match="--min-bit 6 is above --max-bit 4"):
        main(args)
