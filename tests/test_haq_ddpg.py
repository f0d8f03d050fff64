"""HAQ's DDPG agent: networks, soft update, replay buffer, exploration, baseline, exact state round trip."""
import copy
import math

import pytest
import torch

from lib.haq.ddpg import DDPG, ReplayBuffer, soft_update, truncated_normal

STATE_DIM = 9


def fill(agent, episodes, steps=4, seed=0):
    """Stores `episodes` episodes of random transitions with a reward per episode."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(episodes):
        states = torch.rand(steps + 1, STATE_DIM, generator=g)
        transitions = [(states[t], float(torch.rand((), generator=g)), states[t + 1], t == steps - 1)
                       for t in range(steps)]
        agent.observe_episode(transitions, float(torch.randn((), generator=g)))


def test_networks_shapes_and_fresh_actor_near_half():
    agent = DDPG(STATE_DIM, buffer_size=16, seed=0)
    assert [m.out_features for m in agent.actor.net if isinstance(m, torch.nn.Linear)] == [300, 300, 1]
    assert [m.in_features for m in agent.critic.net if isinstance(m, torch.nn.Linear)] == [STATE_DIM + 1, 300, 300]
    states = torch.rand(32, STATE_DIM)
    actions = agent.actor(states)  # (32, 1)
    assert actions.shape == (32, 1)
    # last layer initialised in +-3e-3: the untrained policy proposes ~0.5 (the middle bit width)
    assert torch.all((actions - 0.5).abs() < 0.02)
    assert agent.critic(states, actions).shape == (32, 1)


def test_soft_update_math():
    torch.manual_seed(0)
    source, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = copy.deepcopy(target)
    soft_update(target, source, tau=0.01)
    for t, b, s in zip(target.parameters(), before.parameters(), source.parameters()):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s)


def test_targets_start_equal_and_follow_slowly():
    agent = DDPG(STATE_DIM, buffer_size=64, seed=0, batch_size=8)
    for net, target in ((agent.actor, agent.actor_target), (agent.critic, agent.critic_target)):
        assert all(torch.equal(p, q) for p, q in zip(net.parameters(), target.parameters()))
    fill(agent, 4)
    before = copy.deepcopy(agent.critic_target)
    agent.update_policy()
    for t, b, s in zip(agent.critic_target.parameters(), before.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * s)


def test_replay_buffer_ring_and_uniform_sampling():
    buffer = ReplayBuffer(capacity=10, state_dim=2)
    for i in range(13):
        buffer.push(torch.full((2,), float(i)), i / 100, float(i), torch.full((2,), i + 0.5), i % 4 == 3)
    assert len(buffer) == 10
    assert sorted(buffer.rewards[:, 0].tolist()) == [float(i) for i in range(3, 13)]  # oldest 3 overwritten
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(13)
    for _ in range(2000):
        states, actions, rewards, next_states, dones = buffer.sample(5, g)
        assert rewards.shape == (5, 1) and states.shape == (5, 2)
        assert len(set(rewards[:, 0].tolist())) == 5  # a batch never repeats a transition
        # fields of one transition stay together
        torch.testing.assert_close(states[:, 0], rewards[:, 0])
        torch.testing.assert_close(next_states[:, 0], rewards[:, 0] + 0.5)
        torch.testing.assert_close(dones[:, 0], (rewards[:, 0] % 4 == 3).float())
        counts.index_add_(0, rewards[:, 0].long(), torch.ones(5))
    assert counts[:3].sum() == 0
    # each stored transition drawn with probability 1/2: 1000 of 2000 batches, sd ~22
    assert torch.all((counts[3:] - 1000).abs() < 100)
    same = buffer.sample(5, torch.Generator().manual_seed(7))[2]
    assert torch.equal(same, buffer.sample(5, torch.Generator().manual_seed(7))[2])


def test_truncated_normal_stays_in_unit_interval_with_the_right_mean():
    g = torch.Generator().manual_seed(0)
    for mean in (0.0, 0.5, 1.0):
        for sigma in (0.01, 0.5, 3.0):
            draws = truncated_normal(torch.full((2000,), mean), sigma, g)
            assert draws.min() >= 0 and draws.max() <= 1
    # mean of N(0, 0.5^2) truncated to [0, 1]: mu + sigma (phi(a) - phi(b)) / (Phi(b) - Phi(a)), a=0, b=2
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    expected = 0.5 * (phi(0) - phi(2)) / (Phi(2) - Phi(0))
    draws = truncated_normal(torch.zeros(40000), 0.5, g)
    assert draws.mean().item() == pytest.approx(expected, abs=0.005)
    narrow = truncated_normal(torch.full((2000,), 0.3), 0.01, g)
    assert narrow.mean().item() == pytest.approx(0.3, abs=0.002)


def test_sigma_schedule():
    agent = DDPG(STATE_DIM, buffer_size=8, seed=0)
    assert agent.sigma_at(0) == 0.5
    assert agent.sigma_at(1) == pytest.approx(0.495)
    assert agent.sigma_at(100) == pytest.approx(0.5 * 0.99 ** 100)


def test_actions_in_unit_interval_and_seeded():
    state = torch.rand(STATE_DIM)
    a, b, c = (DDPG(STATE_DIM, buffer_size=8, seed=s) for s in (3, 3, 4))
    draws_a = [a.random_action() for _ in range(5)] + [a.select_action(state, 0.5) for _ in range(20)]
    draws_b = [b.random_action() for _ in range(5)] + [b.select_action(state, 0.5) for _ in range(20)]
    draws_c = [c.random_action() for _ in range(5)] + [c.select_action(state, 0.5) for _ in range(20)]
    assert draws_a == draws_b
    assert draws_a != draws_c
    assert all(0 <= x <= 1 for x in draws_a + draws_c)


def test_moving_average_baseline_and_minimum_batch():
    agent = DDPG(STATE_DIM, buffer_size=64, seed=0, batch_size=8)
    s = torch.zeros(STATE_DIM)
    agent.observe_episode([(s, 0.5, s, True)], -2.0)
    assert agent.moving_average == -2.0
    assert agent.update_policy() is None  # 1 transition < batch of 8: no update
    agent.observe_episode([(s, 0.5, s, True)], 1.0)
    assert agent.moving_average == pytest.approx(-2.0 + 0.5 * 3.0)
    assert len(agent.buffer) == 2 and agent.buffer.rewards[:2, 0].tolist() == [-2.0, 1.0]  # stored raw


def test_critic_learns_the_baselined_target():
    """With one-step episodes (done), the critic regresses r - moving_average."""
    agent = DDPG(2, buffer_size=64, seed=0, batch_size=32)
    states = torch.eye(2)
    for i in range(32):
        agent.observe_episode([(states[i % 2], 0.5, states[i % 2], True)], 1.0 if i % 2 else -1.0)
    baseline = agent.moving_average
    for _ in range(300):
        agent.update_policy()
    with torch.no_grad():
        q = agent.critic(states, torch.full((2, 1), 0.5))[:, 0]
    torch.testing.assert_close(q, torch.tensor([-1.0, 1.0]) - baseline, atol=0.05, rtol=0)


def test_state_dict_round_trip_gives_identical_future(tmp_path):
    agent = DDPG(STATE_DIM, buffer_size=40, seed=1, batch_size=8)
    fill(agent, 12)  # 48 transitions: the ring has wrapped
    for _ in range(5):
        agent.update_policy()
    path = tmp_path / "agent.pt"
    torch.save(agent.state_dict(), path)

    resumed = DDPG(STATE_DIM, buffer_size=40, seed=99, batch_size=8)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    state = torch.rand(STATE_DIM)
    for x in (agent, resumed):
        x.observed = ([x.random_action(), x.select_action(state, 0.3)], [x.update_policy() for _ in range(3)],
                      [x.select_action(state, 0.3) for _ in range(3)])
    assert agent.observed == resumed.observed
    for name in ("actor", "critic", "actor_target", "critic_target"):
        for p, q in zip(getattr(agent, name).parameters(), getattr(resumed, name).parameters()):
            assert torch.equal(p, q)
    assert agent.moving_average == resumed.moving_average


def test_state_dict_is_a_snapshot():
    agent = DDPG(STATE_DIM, buffer_size=40, seed=1, batch_size=8)
    fill(agent, 3)
    saved = agent.state_dict()
    snapshot = saved["actor"]["net.0.weight"].clone()
    agent.update_policy()
    fill(agent, 1)
    assert torch.equal(saved["actor"]["net.0.weight"], snapshot)
    assert saved["buffer"]["size"] == 12


def test_wrong_buffer_shape_is_refused():
    saved = DDPG(STATE_DIM, buffer_size=40, seed=1).state_dict()
    with pytest.raises(ValueError, match="replay buffer"):
        DDPG(STATE_DIM, buffer_size=80, seed=1).load_state_dict(saved)


def test_agent_runs_single_threaded_and_restores_the_thread_count():
    agent = DDPG(STATE_DIM, buffer_size=1000, seed=0, batch_size=8)
    fill(agent, episodes=4)
    seen = []
    agent.critic.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert agent.update_policy() is not None
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}
