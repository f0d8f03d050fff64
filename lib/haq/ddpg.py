"""HAQ's DDPG agent (Lillicrap et al. 2016, as configured by HAQ): actor and critic MLPs, target
networks, replay buffer, moving-average reward baseline, truncated-normal exploration.

Changes from mit-han-lab/haq. Two are choices of ours, where HAQ's way also works:
- the replay buffer stores (s, a, r, s', done) per transition, so no dummy transition is appended
  at the end of an episode (HAQ's sequential memory needs it to sample an episode's first step);
- the moving-average baseline follows episode rewards (once per episode), not the mean of each
  sampled batch's rewards, and is subtracted at learning time from every sampled reward alike.
The others fix bugs there:
- the last layers are initialised uniform(-init_w, init_w) (HAQ accepts init_w and ignores it), so a
  fresh actor answers ~0.5 for every layer;
- no update runs before the buffer holds a full batch (HAQ sampled with replacement and warned);
- every random draw comes from the agent's own generator, which `state_dict` saves: a resumed
  search draws what an uninterrupted one would.
"""
import copy

import torch
import torch.nn as nn

from lib.threads import single_thread


def truncated_normal(mean, sigma, generator, low=0.0, high=1.0):
    """Samples N(mean, sigma^2) restricted to [low, high] by rejection. With mean inside [0, 1] and
    sigma <= 0.5 (HAQ's schedule) a draw is accepted with probability >= 0.47 (mean at an edge), so
    the loop ends after a handful of rounds."""
    mean = torch.as_tensor(mean, dtype=torch.float32)
    out = torch.empty_like(mean)
    todo = torch.ones_like(mean, dtype=torch.bool)
    while todo.any():
        draw = mean + sigma * torch.randn(mean.shape, generator=generator)
        take = todo & (draw >= low) & (draw <= high)
        out[take] = draw[take]
        todo &= ~take
    return out


def _mlp(in_dim, hidden, init_w):
    head = nn.Linear(hidden, 1)
    nn.init.uniform_(head.weight, -init_w, init_w)
    nn.init.uniform_(head.bias, -init_w, init_w)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), head)


class Actor(nn.Module):
    """mu(s): state -> 300 -> 300 -> 1, sigmoid so the action lies in [0, 1]."""

    def __init__(self, state_dim, hidden=300, init_w=3e-3):
        super().__init__()
        self.net = _mlp(state_dim, hidden, init_w)

    def forward(self, state):  # (B, D) -> (B, 1)
        return torch.sigmoid(self.net(state))


class Critic(nn.Module):
    """Q(s, a): (state, action) -> 300 -> 300 -> 1 (HAQ sums two input projections; a concatenation
    is the same function)."""

    def __init__(self, state_dim, hidden=300, init_w=3e-3):
        super().__init__()
        self.net = _mlp(state_dim + 1, hidden, init_w)

    def forward(self, state, action):  # (B, D), (B, 1) -> (B, 1)
        return self.net(torch.cat([state, action], dim=1))


class ReplayBuffer:
    """Fixed-capacity ring of transitions; `sample` draws a batch uniformly without replacement."""

    def __init__(self, capacity, state_dim):
        self.capacity = capacity
        self.states = torch.zeros(capacity, state_dim)
        self.actions = torch.zeros(capacity, 1)
        self.rewards = torch.zeros(capacity, 1)
        self.next_states = torch.zeros(capacity, state_dim)
        self.dones = torch.zeros(capacity, 1)
        self.position = 0  # next slot to write
        self.size = 0

    def __len__(self):
        return self.size

    def push(self, state, action, reward, next_state, done):
        i = self.position
        self.states[i], self.actions[i, 0], self.rewards[i, 0] = state, action, reward
        self.next_states[i], self.dones[i, 0] = next_state, float(done)
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size, generator):
        idx = torch.randperm(self.size, generator=generator)[:batch_size]
        return (self.states[idx], self.actions[idx], self.rewards[idx],
                self.next_states[idx], self.dones[idx])

    def state_dict(self):
        return {"states": self.states.clone(), "actions": self.actions.clone(),
                "rewards": self.rewards.clone(), "next_states": self.next_states.clone(),
                "dones": self.dones.clone(), "position": self.position, "size": self.size}

    def load_state_dict(self, state):
        for key in ("states", "actions", "rewards", "next_states", "dones"):
            if state[key].shape != getattr(self, key).shape:
                raise ValueError(f"replay buffer: saved {key} has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(getattr(self, key).shape)}")
            getattr(self, key).copy_(state[key])
        self.position, self.size = int(state["position"]), int(state["size"])


def soft_update(target, source, tau):
    """theta' <- tau theta + (1 - tau) theta' (DDPG's slowly tracking target networks)."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.mul_(1.0 - tau).add_(s, alpha=tau)


class DDPG:
    """HAQ's agent. buffer_size: HAQ keeps 128 episodes' worth, `128 * len(env)`."""

    def __init__(self, state_dim, buffer_size, seed=0, hidden=300, lr_actor=1e-4, lr_critic=1e-3,
                 tau=0.01, discount=1.0, batch_size=64, sigma_init=0.5, sigma_decay=0.99,
                 moving_alpha=0.5, init_w=3e-3):
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            self.actor = Actor(state_dim, hidden, init_w)
            self.critic = Critic(state_dim, hidden, init_w)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=lr_actor)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=lr_critic)
        self.buffer = ReplayBuffer(buffer_size, state_dim)
        self.generator = torch.Generator().manual_seed(seed)
        self.tau, self.discount, self.batch_size = tau, discount, batch_size
        self.sigma_init, self.sigma_decay = sigma_init, sigma_decay
        self.moving_alpha = moving_alpha
        self.moving_average = None  # baseline: moving average of episode rewards

    def sigma_at(self, policy_episode):
        """Exploration width for the policy_episode-th episode after the warm-up (0 -> sigma_init)."""
        return self.sigma_init * self.sigma_decay ** policy_episode

    def random_action(self):
        """Warm-up episodes: a ~ U[0, 1]."""
        return float(torch.rand((), generator=self.generator))

    def select_action(self, state, sigma):
        """a ~ N(mu(s), sigma^2) truncated to [0, 1]."""
        with torch.no_grad(), single_thread():
            mean = self.actor(state[None])[0, 0]
        return float(truncated_normal(mean, sigma, self.generator))

    def observe_episode(self, transitions, reward):
        """Stores an episode's (state, action, next_state, done) steps, each with the episode's final
        reward (HAQ: every layer's decision is credited with the policy's outcome), and moves the
        baseline towards that reward."""
        for state, action, next_state, done in transitions:
            self.buffer.push(state, action, reward, next_state, done)
        if self.moving_average is None:
            self.moving_average = float(reward)
        else:
            self.moving_average += self.moving_alpha * (float(reward) - self.moving_average)

    def update_policy(self):
        """One critic and one actor step on a sampled batch, then the target networks follow.
        Returns (value_loss, policy_loss), or None while the buffer holds less than a batch."""
        if len(self.buffer) < self.batch_size:
            return None
        with single_thread():
            return self._update()

    def _update(self):
        state, action, reward, next_state, done = self.buffer.sample(self.batch_size, self.generator)
        reward = reward - self.moving_average  # baseline lowers the variance of the critic's targets
        with torch.no_grad():
            next_q = self.critic_target(next_state, self.actor_target(next_state))
            target_q = reward + self.discount * (1.0 - done) * next_q  # (B, 1)

        value_loss = nn.functional.mse_loss(self.critic(state, action), target_q)
        self.critic_optim.zero_grad(set_to_none=True)
        value_loss.backward()
        self.critic_optim.step()

        policy_loss = -self.critic(state, self.actor(state)).mean()
        self.actor_optim.zero_grad(set_to_none=True)
        policy_loss.backward()
        self.actor_optim.step()

        soft_update(self.actor_target, self.actor, self.tau)
        soft_update(self.critic_target, self.critic, self.tau)
        return value_loss.item(), policy_loss.item()

    def state_dict(self):
        """Everything an exact resume needs, as tensors / numbers / dicts (loads with weights_only)."""
        nets = ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim")
        state = {name: copy.deepcopy(getattr(self, name).state_dict()) for name in nets}
        state.update(buffer=self.buffer.state_dict(), generator=self.generator.get_state(),
                     moving_average=self.moving_average)
        return state

    def load_state_dict(self, state):
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim"):
            getattr(self, name).load_state_dict(state[name])
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["generator"])
        self.moving_average = state["moving_average"]
