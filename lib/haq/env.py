"""HAQ's quantization environment (Wang et al., CVPR 2019): one step per searched layer.

The agent sees one layer at a time and answers with an action a in [0, 1] that becomes the layer's
bit width. After the last layer the policy is squeezed into the size budget, the caller quantizes
(and optionally fine-tunes) the model with it and returns a metric; the reward compares that metric
with the fp32 model's.

Layers outside the search (`fixed_bits`, e.g. the first layer and the classifier kept at 8 bits or
fp32) are not steps: the agent never sees them, but they count in the budget at their fixed width
(fp32 = 32 bits), so the searched layers share what is left. They are passed to `evaluate_policy`
with their fixed value, so the bits dict is the complete policy `quantize_model` takes.

The state's last entry is the previous step's action in [0, 1] (0 at the first layer); HAQ wrote
the integer bit width there, into a column it never normalised, of a table shared across episodes.
"""
import math

import torch

FP32_BITS = 32


def action_to_bit(action, min_bit, max_bit):
    """HAQ's continuous action space: equal-width bins over [0, 1], one per bit width (a = 0 -> min_bit, a = 1 -> max_bit).

    `floor(x + 0.5)` rounds halves up, so every bin has width 1 / (max_bit - min_bit + 1); Python's
    `round` would round halves to even and make the bins uneven at their edges.
    """
    x = action * (max_bit - min_bit + 1) + min_bit - 0.5
    return min(max(math.floor(x + 0.5), min_bit), max_bit)


def fit_budget(bits, n_weights, budget_bits, min_bit):
    """HAQ's final action wall: take bits away one at a time, walking from the last layer to the
    first and repeating the walk, until `sum n_l b_l <= budget_bits` or every layer is at min_bit.

    `bits` and `n_weights` are the searched layers in step order; `budget_bits` is what the searched
    layers may spend (the budget minus the fixed layers). Returns a new list.
    """
    bits = list(bits)
    total = sum(n * b for n, b in zip(n_weights, bits))
    while total > budget_bits and any(b > min_bit for b in bits):
        for i in reversed(range(len(bits))):
            if bits[i] > min_bit:
                bits[i] -= 1
                total -= n_weights[i]
                if total <= budget_bits:
                    break
    return bits


def layer_features(layers, indices):
    """Static part of HAQ's layer embedding: (L, 8) = index in the model, in, out, kernel size,
    stride, #weights, input size, conv flag; min-max normalised per column (a constant column
    becomes 0)."""
    rows = [[index, layer.in_features, layer.out_features, layer.kernel_size, layer.stride,
             layer.n_weights, layer.input_size, layer.kind != "linear"] for layer, index in zip(layers, indices)]
    features = torch.tensor(rows, dtype=torch.float32)  # (L, 8)
    low, high = features.min(0).values, features.max(0).values
    span = high - low
    return torch.where(span > 0, (features - low) / span.clamp_min(1e-12), torch.zeros_like(features))


class InfeasibleBudget(ValueError):
    """check_search_space's error for a budget below the smallest policy the search can make:
    `least_ratio`, the smallest preserve_ratio that holds it, lets a script name its flags."""

    def __init__(self, message, least_ratio):
        super().__init__(message)
        self.least_ratio = least_ratio


def check_search_space(layers, preserve_ratio, min_bit, max_bit, fixed_bits):
    """A one-line ValueError for a search that cannot run (bad widths or names, nothing to
    search, a budget that even min_bit everywhere exceeds); else (the budget in weight bits, the
    fixed layers' bits). Needs no model run, so search.py checks before its costly set-up."""
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError("HAQ environment: layer names are not unique")
    unknown = sorted(set(fixed_bits) - set(names))
    if unknown:
        raise ValueError(f"HAQ environment: fixed_bits names unknown layers {unknown}")
    for name, b in fixed_bits.items():
        if b is not None and not (isinstance(b, int) and 1 <= b <= FP32_BITS):
            raise ValueError(f"HAQ environment: fixed bits for {name} must be 1..32 or None, got {b!r}")
    if not 1 <= min_bit <= max_bit <= FP32_BITS:
        raise ValueError(f"HAQ environment: need 1 <= min_bit <= max_bit <= 32, got {min_bit}, {max_bit}")
    if not 0 < preserve_ratio <= 1:
        raise ValueError(f"HAQ environment: preserve_ratio must be in (0, 1], got {preserve_ratio}")
    searched = [int(layer.n_weights) for layer in layers if layer.name not in fixed_bits]
    if not searched:
        raise ValueError("HAQ environment: every layer is fixed, nothing to search")
    n_by_name = {layer.name: int(layer.n_weights) for layer in layers}
    budget_bits = preserve_ratio * FP32_BITS * sum(n_by_name.values())
    fixed_cost = sum(n_by_name[name] * (FP32_BITS if b is None else b) for name, b in fixed_bits.items())
    need = fixed_cost + min_bit * sum(searched)
    if need > budget_bits:
        least = need / (FP32_BITS * sum(n_by_name.values()))
        raise InfeasibleBudget(
            f"HAQ budget infeasible: preserve_ratio {preserve_ratio} allows {budget_bits:.0f} weight bits, "
            f"but the fixed layers plus every searched layer at min_bit={min_bit} need {need} "
            f"(preserve_ratio {least:.6g})", least)
    return budget_bits, fixed_cost


class QuantEnv:
    """`reset() -> state`, `step(action) -> (next_state, reward, done, info)`.

    layers: objects with LayerInfo's fields (name, kind, in_features, out_features, kernel_size,
    stride, n_weights, input_size), in model order. evaluate_policy(bits) -> metric, where bits maps
    every layer name to its width (None = fp32 for fixed layers). Model-size budget:
    `sum_l n_l b_l <= preserve_ratio * 32 * sum_l n_l` over all layers, fixed ones included.

    Reward scale: HAQ's metric was accuracy in percent; a fraction in [0, 1] gives rewards 100x
    smaller, which Adam's scale-free steps absorb (the toy search of tests/test_haq_search.py finds
    its optimum for 8 of 12 seeds with fractions, 9 with percent).
    """

    def __init__(self, layers, evaluate_policy, metric_fp32, preserve_ratio,
                 min_bit=2, max_bit=8, fixed_bits=None):
        fixed_bits = dict(fixed_bits or {})
        if not math.isfinite(metric_fp32):
            raise FloatingPointError(f"HAQ environment: the fp32 model's metric is {metric_fp32}; "
                                     f"every reward would be too")
        self.budget_bits, self.fixed_cost = check_search_space(layers, preserve_ratio, min_bit,
                                                               max_bit, fixed_bits)
        names = [layer.name for layer in layers]
        positions = [i for i, layer in enumerate(layers) if layer.name not in fixed_bits]
        self.searched = [layers[i] for i in positions]
        self.fixed_bits = {name: fixed_bits[name] for name in names if name in fixed_bits}
        self.evaluate_policy = evaluate_policy
        self.metric_fp32 = metric_fp32
        self.min_bit, self.max_bit = min_bit, max_bit
        self.layer_names = names
        self.n_weights = [int(layer.n_weights) for layer in self.searched]
        self.total_weights = sum(int(layer.n_weights) for layer in layers)

        self.features = layer_features(self.searched, positions)  # (L, 8)
        self.state_dim = self.features.shape[1] + 1  # + previous action
        self._step = None

    def __len__(self):
        return len(self.searched)

    def _state(self, step, previous_action):
        return torch.cat([self.features[step], torch.tensor([previous_action], dtype=torch.float32)])

    def reset(self):
        self._step, self._actions, self._bits = 0, [], []
        return self._state(0, 0.0)

    def step(self, action):
        if self._step is None or self._step >= len(self):
            raise RuntimeError("HAQ environment: call reset() before step()")
        action = float(action)
        if math.isnan(action):
            raise ValueError("HAQ environment: action is NaN")
        self._actions.append(action)
        self._bits.append(action_to_bit(action, self.min_bit, self.max_bit))
        self._step += 1
        if self._step < len(self):
            return self._state(self._step, action), 0.0, False, {}

        searched_bits = fit_budget(self._bits, self.n_weights, self.budget_bits - self.fixed_cost, self.min_bit)
        by_name = {layer.name: b for layer, b in zip(self.searched, searched_bits)}
        bits = {name: by_name[name] if name in by_name else self.fixed_bits[name] for name in self.layer_names}
        metric = float(self.evaluate_policy(dict(bits)))
        if not math.isfinite(metric):
            # A NaN reward never loses a comparison, so it stays the best policy, and it makes
            # the agent's baseline, critic and actor NaN, after which no exploration draw is
            # ever accepted: the search stops here instead.
            raise FloatingPointError(
                f"HAQ environment: the policy of widths {sorted(set(searched_bits))} scored "
                f"{metric}; search stopped (its reward would stay the best and make the agent NaN)")
        reward = 0.1 * (metric - self.metric_fp32)  # HAQ: lambda (acc_quant - acc_origin), lambda = 0.1
        used = self.fixed_cost + sum(n * b for n, b in zip(self.n_weights, searched_bits))
        info = {"bits": bits, "budget_ratio": used / (FP32_BITS * self.total_weights), "metric": metric,
                "actions": list(self._actions)}
        # The terminal next state is never bootstrapped from (done masks it); give the last layer's.
        return self._state(len(self) - 1, action), reward, True, info
