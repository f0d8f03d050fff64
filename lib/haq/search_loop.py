"""HAQ's search loop: episodes of the environment driven by the DDPG agent, the best policy kept,
resumable after any episode.

The caller owns logging and checkpoints: `on_episode(record, state)` receives the episode's record
and the resumable state, which the caller saves (atomically) and later passes back as `state=`.
A resumed search ends exactly where the uninterrupted one would (same seed, deterministic
evaluate_policy): the agent's state holds its networks, optimisers, buffer and random generator.
"""


def _better(record, best):
    """Highest reward wins; a tie goes to the smaller model, then to the earlier episode."""
    if best is None:
        return True
    return (record["reward"], -record["budget_ratio"]) > (best["reward"], -best["budget_ratio"])


def run_search(env, agent, episodes, warmup, on_episode=None, state=None):
    """Runs episodes [state["episode"] or 0, episodes). Episodes below `warmup` take uniform random
    actions and only fill the replay buffer; later ones explore around the actor with
    sigma = sigma_init * sigma_decay^(episode - warmup) and are followed by one agent update per
    layer (HAQ's schedule; HAQ's `episode <= warmup` ran one warm-up episode more than asked).
    Returns {"best": record, "history": [record, ...]}.

    record: episode, bits, budget_ratio, metric, reward, sigma (None while warming up),
    value_loss / policy_loss (mean over the episode's updates, None without updates).
    state: {"agent", "episode" (next to run), "best", "history"}.
    """
    if state is None:
        start, best, history = 0, None, []
    else:
        missing = {"agent", "episode", "best", "history"} - set(state)
        if missing:
            raise ValueError(f"HAQ search state lacks {sorted(missing)}")
        agent.load_state_dict(state["agent"])
        start, best, history = int(state["episode"]), state["best"], list(state["history"])

    for episode in range(start, episodes):
        sigma = None if episode < warmup else agent.sigma_at(episode - warmup)
        observation, done, transitions = env.reset(), False, []
        while not done:
            action = agent.random_action() if sigma is None else agent.select_action(observation, sigma)
            next_observation, reward, done, info = env.step(action)
            transitions.append((observation, action, next_observation, done))
            observation = next_observation
        agent.observe_episode(transitions, reward)
        losses = [agent.update_policy() for _ in transitions] if sigma is not None else []
        losses = [loss for loss in losses if loss is not None]

        record = {"episode": episode, "bits": info["bits"], "budget_ratio": info["budget_ratio"],
                  "metric": info["metric"], "reward": reward, "sigma": sigma,
                  "value_loss": sum(v for v, _ in losses) / len(losses) if losses else None,
                  "policy_loss": sum(p for _, p in losses) / len(losses) if losses else None}
        history.append(record)
        if _better(record, best):
            best = record
        if on_episode is not None:
            on_episode(record, {"agent": agent.state_dict(), "episode": episode + 1,
                                "best": best, "history": list(history)})
    return {"best": best, "history": history}
