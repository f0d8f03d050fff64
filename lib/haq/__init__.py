"""HAQ (Wang et al., CVPR 2019): per-layer bit-width search with a DDPG agent."""
from lib.haq.ddpg import DDPG
from lib.haq.env import QuantEnv, action_to_bit, fit_budget
from lib.haq.plot import plot_policy
from lib.haq.search_loop import run_search

__all__ = ["DDPG", "QuantEnv", "action_to_bit", "fit_budget", "plot_policy", "run_search"]
