"""HAQ search loop: learning beats random search on a toy with a known answer, exact resume,
best-policy bookkeeping, the policy plot."""
import math
from types import SimpleNamespace

import pytest
import torch

from lib.haq import DDPG, QuantEnv, plot_policy, run_search


def toy_layers(sensitive):
    """Six layers of 1024 weights; the sensitive one is shaped like a point network's first layer."""
    return [SimpleNamespace(name=f"layer{i}", kind="conv1d", in_features=4, out_features=256, kernel_size=1,
                            stride=1, n_weights=1024, input_size=2048) if i == sensitive else
            SimpleNamespace(name=f"layer{i}", kind="linear", in_features=32, out_features=32, kernel_size=1,
                            stride=1, n_weights=1024, input_size=512)
            for i in range(6)]


def toy_metric(sensitive):
    """Accuracy in percent; each layer loses s_l 2^-b_l, the sensitive layer with s = 64, the rest s = 1."""
    def metric(bits):
        loss = sum((64.0 if name == f"layer{sensitive}" else 1.0) * 0.5 ** b for name, b in bits.items())
        return 100.0 * math.exp(-loss / 4)
    return metric


def toy_env(sensitive, calls=None):
    metric = toy_metric(sensitive)

    def evaluate(bits):
        if calls is not None:
            calls.append(dict(bits))
        return metric(bits)
    # 3 bits on average: the best policy is 8 bits for the sensitive layer and 2 for the rest
    return QuantEnv(toy_layers(sensitive), evaluate, 100.0, preserve_ratio=3 / 32)


def best_bits(result):
    return [result["best"]["bits"][f"layer{i}"] for i in range(6)]


def test_agent_finds_the_known_best_policy_that_random_search_misses():
    """Six equal layers, 3 bits each on average; layer0 (the only conv, 4 input channels) loses 64x
    more than the others per quantization error, so the best policy is [8, 2, 2, 2, 2, 2]: every
    bit the other layers take from it costs more than it gains. Random search must draw layer0 in the
    top bin and all five others in the bottom two at once (~3e-4 per episode) to get there.

    HAQ's schedule compressed to 80 episodes: 20 random warm-up, then sigma decays 0.95 per episode
    instead of 0.99 (600 episodes in the paper). Within 80 episodes the agent found the optimum for
    9 of seeds 0-11 (5 of the 6 used here), random search for none. The random baseline is the same
    loop with every episode a warm-up episode: the agent replaced by uniform actions, its first 20
    episodes identical to the agent's.
    """
    optimum = [8, 2, 2, 2, 2, 2]
    found, agent_rewards, random_rewards = 0, [], []
    for seed in range(6):
        env = toy_env(sensitive=0)
        agent = run_search(env, DDPG(env.state_dim, buffer_size=128 * len(env), seed=seed, sigma_decay=0.95),
                           episodes=80, warmup=20)
        random = run_search(env, DDPG(env.state_dim, buffer_size=128 * len(env), seed=seed),
                            episodes=80, warmup=80)
        assert best_bits(random) != optimum
        found += best_bits(agent) == optimum
        agent_rewards.append(agent["best"]["reward"])
        random_rewards.append(random["best"]["reward"])
    assert found >= 3, (found, agent_rewards, random_rewards)
    assert sum(agent_rewards) > sum(random_rewards) + 1.0, (agent_rewards, random_rewards)


def test_resumed_search_ends_where_the_uninterrupted_one_does(tmp_path):
    def agent_for(seed):
        return DDPG(9, buffer_size=64, seed=seed, batch_size=16)

    straight_calls, resumed_calls = [], []
    straight_agent = agent_for(5)
    straight = run_search(toy_env(0, straight_calls), straight_agent, episodes=6, warmup=2)

    path = tmp_path / "search_state.pt"

    def save(record, state):  # what search.py does after each episode
        torch.save(state, path)
        assert state["episode"] == record["episode"] + 1

    run_search(toy_env(0, resumed_calls), agent_for(5), episodes=3, warmup=2, on_episode=save)
    state = torch.load(path, weights_only=True)
    assert state["episode"] == 3 and len(state["history"]) == 3
    resumed_agent = agent_for(123)  # the saved state replaces everything the seed set up
    resumed = run_search(toy_env(0, resumed_calls), resumed_agent, episodes=6, warmup=2, state=state)

    assert resumed_calls == straight_calls  # the same six policies were evaluated
    assert resumed["best"] == straight["best"]
    assert resumed["history"] == straight["history"]
    assert any(r["value_loss"] is not None for r in straight["history"])  # the agent did learn on the way
    for name in ("actor", "critic", "actor_target", "critic_target"):
        for p, q in zip(getattr(straight_agent, name).parameters(), getattr(resumed_agent, name).parameters()):
            assert torch.equal(p, q)
    assert torch.equal(straight_agent.generator.get_state(), resumed_agent.generator.get_state())
    assert straight_agent.moving_average == resumed_agent.moving_average


def test_records_and_schedule():
    env = toy_env(0)
    agent = DDPG(env.state_dim, buffer_size=128, seed=0, batch_size=16)
    seen = []
    result = run_search(env, agent, episodes=6, warmup=3, on_episode=lambda record, state: seen.append(record))
    assert seen == result["history"] and [r["episode"] for r in seen] == list(range(6))
    assert [r["sigma"] for r in seen] == [None, None, None, 0.5, pytest.approx(0.495), pytest.approx(0.49005)]
    assert [r["value_loss"] is None for r in seen] == [True] * 3 + [False] * 3  # 18 transitions >= 16 by then
    for r in seen:
        assert set(r) == {"episode", "bits", "budget_ratio", "metric", "reward", "sigma", "value_loss", "policy_loss"}
        assert r["reward"] == pytest.approx(0.1 * (r["metric"] - 100.0))
        assert r["budget_ratio"] <= 3 / 32 + 1e-9
    assert result["best"]["reward"] == max(r["reward"] for r in seen)


def test_best_prefers_higher_reward_then_smaller_model():
    layers = toy_layers(0)
    env = QuantEnv(layers, lambda bits: 50.0, 100.0, preserve_ratio=1.0)  # every policy scores the same
    result = run_search(env, DDPG(env.state_dim, buffer_size=256, seed=0), episodes=30, warmup=30)
    history, best = result["history"], result["best"]
    smallest = min(r["budget_ratio"] for r in history)
    assert best["budget_ratio"] == smallest
    assert best["episode"] == next(r["episode"] for r in history if r["budget_ratio"] == smallest)
    assert len({r["budget_ratio"] for r in history}) > 1  # the tie-break had something to choose


def test_bad_resume_state_is_refused():
    env = toy_env(0)
    with pytest.raises(ValueError, match="lacks"):
        run_search(env, DDPG(env.state_dim, buffer_size=64), episodes=2, warmup=1, state={"episode": 1})


def test_plot_policy_writes_png(tmp_path):
    names = [f"enc.blocks.{i}.attn.fc_{k}" for i in range(4) for k in ("q", "k", "v")] + ["seg_head.fc"]
    bits = [None] + [2, 3, 4, 5, 6, 7, 8, 3, 4, 5, 6] + [8]
    sizes = [192] + [4096 * (i + 1) for i in range(11)] + [640]
    path = plot_policy(str(tmp_path / "policy.png"), names, bits, sizes, fixed_names=["seg_head.fc"])
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match="must match"):
        plot_policy(str(tmp_path / "bad.png"), names, bits[:-1], sizes)
