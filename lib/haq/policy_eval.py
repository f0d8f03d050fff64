"""The reward's measurement: quantize a copy of the fp32 model with a policy, optionally
fine-tune it for a few steps, and score it on a fixed subset of the held-out training data.
The subset is collated and moved to the device once, its FPS and kNN are recorded on the
first pass and replayed after (pointops.GeometryTape: they depend on the points, not on the
weights), and k-means results are cached per (layer, bits), so an episode costs one clustering
per new (layer, bits) and one forward pass of the networks' layers over the subset."""
import copy

import torch

from lib import pointops
from lib.metrics import metric_key
from lib.quant import KMeansCache, dequantize, quantize_model
from lib.tasks import model_inputs, supervised_loss, to_device
from lib.train import evaluate


def cached_batches(dataset, indices, batch_size, device, workers=0):
    """The samples at `indices`, collated into batches already on `device` (read by `workers`
    DataLoader processes)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices),
                                         batch_size=batch_size, num_workers=workers)
    return [to_device(batch, device) for batch in loader]


class PolicyEvaluator:
    """evaluate_policy(bits) -> metric, for lib.haq.env.QuantEnv."""

    def __init__(self, fp32_model, dataset, eval_batches, device, method="kmeans",
                 train_batches=(), finetune_steps=0, finetune_lr=1e-4, amp=None):
        self.fp32_model = fp32_model.eval()
        self.dataset, self.eval_batches, self.device = dataset, eval_batches, device
        self.method, self.amp = method, amp
        self.train_batches, self.finetune_steps, self.finetune_lr = train_batches, finetune_steps, finetune_lr
        self.cache = KMeansCache()
        self.tapes = [pointops.GeometryTape() for _ in eval_batches]  # one per fixed batch
        self.key = metric_key(dataset.task)

    def quantized(self, bits):
        # Without a fine-tune an episode only reads the weights, so its copy shares the fp32
        # model's parameters (quantize_model replaces a layer's weight, never writes into it):
        # no weights are copied, and the k-means cache knows them without hashing them again.
        shared = {} if self.finetune_steps else {id(p): p for p in self.fp32_model.parameters()}
        return quantize_model(copy.deepcopy(self.fp32_model, shared), bits, method=self.method,
                              cache=self.cache)

    def score(self, model):
        return evaluate(model, self._taped_batches(), self.device, self.amp, desc="search eval",
                        dataset=self.dataset)

    def _taped_batches(self):
        """The eval batches, each yielded inside its geometry tape, so the forward pass that
        consumes a batch records (first episode) or replays (later ones) its FPS and kNN."""
        for batch, tape in zip(self.eval_batches, self.tapes):
            with tape:
                yield batch

    def _finetune(self, model):
        """HAQ's optional short fine-tune before the reward: a few steps on training batches."""
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=self.finetune_lr, momentum=0.9)
        for step in range(self.finetune_steps):
            batch = self.train_batches[step % len(self.train_batches)]
            loss = supervised_loss(model(*model_inputs(batch, self.dataset.task)), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def __call__(self, bits):
        model = self.quantized(bits)
        if self.finetune_steps:
            self._finetune(model)
        # dense weights: each forward would otherwise look every shared weight up again
        return self.score(dequantize(model))[self.key]
