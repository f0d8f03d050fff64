"""lib/haq/policy_eval.py: an episode's score equals a fresh evaluation of the quantized model,
while the search subset's FPS and kNN are computed once and the clusterings once per
(layer, bits)."""
import copy

import pytest
import torch
from toy import ToyPoints

from lib.ops import geometry
from lib.haq.policy_eval import PolicyEvaluator, cached_batches
from lib.quant import list_quantizable, quantize_model
from lib.train import evaluate
from models import build_model

CPU = torch.device("cpu")


def test_episodes_replay_geometry_and_score_like_a_fresh_evaluation(monkeypatch):
    torch.manual_seed(0)
    data = ToyPoints(8, num_points=64)
    model = build_model("pt_semseg_tiny", in_channels=3, num_classes=3).eval()
    fp32_state = copy.deepcopy(model.state_dict())
    batches = cached_batches(data, list(range(8)), 4, CPU)
    evaluator = PolicyEvaluator(model, data, batches, CPU)
    layers = list_quantizable(model)
    policy = {layer.name: 2 + i % 3 for i, layer in enumerate(layers)}
    quantized = quantize_model(copy.deepcopy(model), policy)
    expected = evaluate(quantized, batches, CPU, dataset=data)[evaluator.key]
    fp32 = evaluate(model, batches, CPU, dataset=data)[evaluator.key]

    assert evaluator(policy) == pytest.approx(expected, abs=1e-12)
    assert all(tape.recorded for tape in evaluator.tapes)
    assert evaluator.cache.misses == len(layers) and evaluator.cache.hits == 0

    def computed(*args):
        raise AssertionError("the geometry of a cached batch was computed again")
    for name in ("farthest_point_sample_cpu", "farthest_point_sample_reference",
                 "knn_query_cpu", "knn_query_reference"):
        monkeypatch.setattr(geometry, name, computed)
    assert evaluator(policy) == pytest.approx(expected, abs=1e-12)
    assert evaluator.cache.misses == len(layers) and evaluator.cache.hits == len(layers)
    # the episodes read the fp32 model's own parameters: each was hashed (copied to the
    # host) once, in the first episode
    assert evaluator.cache.hashed == len(layers)
    assert evaluator.score(model)[evaluator.key] == pytest.approx(fp32, abs=1e-12)
    for key, value in model.state_dict().items():  # the fp32 model is never touched
        assert torch.equal(value, fp32_state[key]), key
