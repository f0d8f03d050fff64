"""lib/haq/policy_eval.py: an episode's score equals a fresh evaluation of the quantized model
(after HAQ's short fine-tune when asked), while the cached batches' FPS and kNN are computed
once and the clusterings once per (layer, bits)."""
import copy

import pytest
import torch
from toy import ToyPoints

from lib.ops import geometry
from lib.haq.policy_eval import (PolicyEvaluator, cached_batches, finetune_batches,
                                 haq_finetune_steps)
from lib.quant import list_quantizable, quantize_model
from lib.tasks import model_inputs, supervised_loss
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


def test_finetune_before_the_reward_is_haqs_sgd_and_replays_its_geometry(monkeypatch):
    torch.manual_seed(0)
    data = ToyPoints(12, num_points=64)
    model = build_model("pt_semseg_tiny", in_channels=3, num_classes=3).eval()
    fp32_state = copy.deepcopy(model.state_dict())
    eval_batches = cached_batches(data, list(range(8)), 4, CPU)
    train_batches = finetune_batches(data, 3, 4, CPU, seed=1)
    assert len(train_batches) == 3 and all(len(b["label"]) == 4 for b in train_batches)
    assert PolicyEvaluator(model, data, eval_batches, CPU).finetune_lr == 1e-3  # HAQ's
    # a larger step than HAQ's, so that 3 steps of an untrained model move its score
    evaluator = PolicyEvaluator(model, data, eval_batches, CPU, train_batches=train_batches,
                                finetune_steps=3, finetune_lr=1.0)
    policy = {layer.name: 2 + i % 3 for i, layer in enumerate(list_quantizable(model))}

    # the same by hand: HAQ's optimizer, train mode, one step per cached batch
    expected_model = quantize_model(copy.deepcopy(model), policy).train()
    optimizer = torch.optim.SGD(expected_model.parameters(), lr=1.0, momentum=0.9,
                                weight_decay=4e-5)
    for batch in train_batches:
        loss = supervised_loss(expected_model(*model_inputs(batch, data.task)), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = evaluate(expected_model, eval_batches, CPU, dataset=data)[evaluator.key]
    untuned = evaluate(quantize_model(copy.deepcopy(model), policy), eval_batches, CPU,
                       dataset=data)[evaluator.key]

    assert evaluator(policy) == pytest.approx(expected, abs=1e-12)
    assert expected != untuned  # the fine-tune changed the score
    assert all(tape.recorded for tape in evaluator.train_tapes)

    def computed(*args):
        raise AssertionError("the geometry of a cached batch was computed again")
    for name in ("farthest_point_sample_cpu", "farthest_point_sample_reference",
                 "knn_query_cpu", "knn_query_reference"):
        monkeypatch.setattr(geometry, name, computed)
    assert evaluator(policy) == pytest.approx(expected, abs=1e-12)  # same reward every time
    for key, value in model.state_dict().items():  # the fp32 model is never touched
        assert torch.equal(value, fp32_state[key]), key


def test_haq_finetune_length_and_batches_that_wrap_around():
    assert haq_finetune_steps(10_000, 256) == 79  # HAQ: 20,000 training images at batch 256
    assert haq_finetune_steps(200, 16) == 25
    data = ToyPoints(5, num_points=8)
    batches = finetune_batches(data, 4, 3, CPU)  # 12 samples drawn from 5
    assert [len(b["label"]) for b in batches] == [3, 3, 3, 3]
    assert finetune_batches(data, 0, 3, CPU) == []


class WithDropout(torch.nn.Module):
    """A segmentation model whose logits pass a Dropout, as the classifiers' heads do."""

    def __init__(self, model):
        super().__init__()
        self.model, self.drop = model, torch.nn.Dropout(0.5)

    def forward(self, *inputs):
        return self.drop(self.model(*inputs))


def test_a_policys_reward_does_not_depend_on_the_global_random_state():
    """The reward's fine-tune draws Dropout masks: from the global generator, one policy had
    another reward in each episode, and a resumed search (which restores the agent's generator,
    not torch's) ended elsewhere than an uninterrupted one. The masks are read off the Dropout
    (a hook, which the evaluator's copies of the model keep): the reward, a metric of 8 tiny
    clouds, takes too few values to tell two seeds apart."""
    torch.manual_seed(0)
    data = ToyPoints(12, num_points=64)
    model = WithDropout(build_model("pt_semseg_tiny", in_channels=3, num_classes=3)).eval()
    masks = []
    model.drop.register_forward_hook(
        lambda module, inputs, out: masks.append(out == 0) if module.training else None)
    evaluator = PolicyEvaluator(model, data, cached_batches(data, list(range(8)), 4, CPU), CPU,
                                train_batches=finetune_batches(data, 3, 4, CPU, seed=1),
                                finetune_steps=3, finetune_lr=1.0, seed=5)
    policy = {layer.name: 3 for layer in list_quantizable(model)}

    def episode():
        masks.clear()
        reward = evaluator(policy)
        assert len(masks) == 3  # one per fine-tune step
        return reward, torch.stack(masks)

    first, first_masks = episode()
    torch.manual_seed(123)  # another global state, as after other episodes or a resume
    state = torch.get_rng_state()
    again, again_masks = episode()
    assert again == first and torch.equal(again_masks, first_masks)
    assert torch.equal(torch.get_rng_state(), state)  # and the episode left it alone
    evaluator.seed = 6
    assert not torch.equal(episode()[1], first_masks)  # the seed is what sets the masks