"""The reward's measurement (HAQ, Wang et al. CVPR 2019, Sec. 3.4 and its code's
lib/env/quantize_env.py): quantize a copy of the fp32 model with a policy, fine-tune it briefly
as HAQ does before every reward, and score it on a fixed subset of the held-out training data.

Made fast: the subsets are collated and moved to the device once; their FPS and kNN are recorded
on the first pass and replayed after (ops.GeometryTape: they depend on the points, not on
the weights), for the fine-tune's batches as for the scored ones; k-means results are cached per
(layer, bits). An episode then costs one clustering per new (layer, bits), the fine-tune's steps
and one forward pass over the scored subset.

Scoring is per point of the sampled samples, never through S3DIS's per-room voter: a subset of
a room's crops leaves some of its points without a vote, and the reward only ranks policies.
The final reports (eval.py, finetune.py's test score) still vote whole rooms.

Under torchrun each rank scores its share of the scored batches and the metric is merged exactly
(lib.train.evaluate); the policy is rank 0's (broadcast), every rank runs the same fine-tune on the
same batches and then takes rank 0's fine-tuned weights, so all ranks score one model.
"""
import contextlib
import copy

import torch

from lib import distributed, ops
from lib.checkpoint import non_finite_entry
from lib.metrics import metric_key
from lib.quant import KMeansCache, dequantize, quantize_model
from lib.tasks import model_inputs, supervised_loss, to_device
from lib.train import autocast, evaluate

# HAQ's fine-tune (rl_quantize.py, quantize_env.py): one epoch over its 20,000-image training
# subset, twice its 10,000-image reward subset, by SGD at lr 1e-3 with momentum 0.9 and weight
# decay 4e-5 (the optimizer its reset() builds), in train mode.
FINETUNE_LR = 1e-3
FINETUNE_MOMENTUM = 0.9
FINETUNE_WEIGHT_DECAY = 4e-5
FINETUNE_SAMPLES_PER_SCORED = 2


def haq_finetune_steps(val_size, batch_size):
    """HAQ's fine-tune length for a reward subset of `val_size` samples: one pass over twice
    as many training samples."""
    return -(-FINETUNE_SAMPLES_PER_SCORED * val_size // batch_size)


def cached_batches(dataset, indices, batch_size, device, workers=0):
    """The samples at `indices`, collated into batches already on `device` (read by `workers`
    DataLoader processes)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices),
                                         batch_size=batch_size, num_workers=workers)
    return [to_device(batch, device) for batch in loader]


def reward_batches(held_out, val_size, batch_size, device, seed=0, workers=0):
    """This rank's share of the scored subset: `val_size` samples of `held_out` drawn by `seed`,
    batched, and every world-th batch from this rank's on (whole batches, so each is computed
    exactly as in one process)."""
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))
    batches = cached_batches(held_out, order[:val_size].tolist(), batch_size, device, workers)
    return batches[distributed.rank()::distributed.world_size()]


def finetune_batches(train, steps, batch_size, device, seed=0, workers=0):
    """The fine-tune's `steps` batches of the training split (drawn by `seed`, without
    augmentation), the same on every rank and in every episode."""
    if not steps:
        return []
    picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    picks = picks.repeat(-(-steps * batch_size // len(train)))[:steps * batch_size]
    return cached_batches(train, picks.tolist(), batch_size, device, workers)


@contextlib.contextmanager
def seeded_rng(device, seed):
    """Inside the block the CPU's generator and `device`'s (a GPU's current one) start from
    `seed`; after it, both are as they were before."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


class PolicyEvaluator:
    """evaluate_policy(bits) -> metric, for lib.haq.env.QuantEnv."""

    def __init__(self, fp32_model, dataset, eval_batches, device, method="kmeans",
                 train_batches=(), finetune_steps=0, finetune_lr=FINETUNE_LR, amp=None, seed=0):
        self.fp32_model = fp32_model.eval()
        self.dataset, self.eval_batches, self.device = dataset, eval_batches, device
        self.method, self.amp = method, amp
        self.train_batches, self.finetune_steps, self.finetune_lr = train_batches, finetune_steps, finetune_lr
        self.seed = seed
        if finetune_steps and not train_batches:
            raise ValueError("PolicyEvaluator: finetune_steps needs train_batches")
        self.cache = KMeansCache()
        self.tapes = [ops.GeometryTape() for _ in eval_batches]  # one per fixed batch
        self.train_tapes = [ops.GeometryTape() for _ in train_batches]
        self.key = metric_key(dataset.task)

    def quantized(self, bits):
        # Without a fine-tune an episode only reads the weights, so its copy shares the fp32
        # model's parameters (quantize_model replaces a layer's weight, never writes into it):
        # no weights are copied, and the k-means cache knows them without hashing them again.
        shared = {} if self.finetune_steps else {id(p): p for p in self.fp32_model.parameters()}
        return quantize_model(copy.deepcopy(self.fp32_model, shared), bits, method=self.method,
                              cache=self.cache)

    def score(self, model):
        """The metric dict of `model` on the scored subset, per point (no room voting)."""
        return evaluate(model, _Taped(self.eval_batches, self.tapes), self.device, self.amp,
                        desc="search eval", dataset=self.dataset, vote=False)

    def _finetune(self, model):
        """HAQ's short fine-tune before the reward: SGD steps on the cached training batches,
        in train mode (BatchNorm statistics move too, as in HAQ). Its random draws (the
        classifiers' Dropout) start from `seed` every time and leave the global generators as
        they were, so that a policy's reward is the same in every episode and a resumed search
        ends where an uninterrupted one does."""
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=self.finetune_lr,
                                    momentum=FINETUNE_MOMENTUM, weight_decay=FINETUNE_WEIGHT_DECAY)
        n = len(self.train_batches)
        with seeded_rng(self.device, self.seed):
            for step in range(self.finetune_steps):
                batch, tape = self.train_batches[step % n], self.train_tapes[step % n]
                with tape, autocast(self.device, self.amp):
                    logits = model(*model_inputs(batch, self.dataset.task))
                loss = supervised_loss(logits.float(), batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        distributed.broadcast_module(model)  # one model on every rank, whatever the GPU's sums
        # a diverged candidate would still score (a NaN model predicts one class everywhere),
        # and could become the search's best policy
        name = non_finite_entry(model)
        if name is not None:
            raise FloatingPointError(f"the reward's fine-tune ({self.finetune_steps} steps at "
                                     f"--finetune-lr {self.finetune_lr:g}) left {name} NaN or "
                                     f"infinite; search stopped: start it again with a lower "
                                     f"--finetune-lr and --overwrite (the rewards so far were "
                                     f"measured with this rate, so --resume keeps it)")

    def __call__(self, bits):
        bits = distributed.broadcast_object(bits)  # rank 0's policy is the one scored
        model = self.quantized(bits)
        if self.finetune_steps:
            self._finetune(model)
        # dense weights: each forward would otherwise look every shared weight up again
        return self.score(dequantize(model))[self.key]


class _Taped:
    """The batches, each yielded inside its geometry tape, so the forward pass that consumes a
    batch records (first use) or replays (later ones) its FPS and kNN. Has a length, so that
    the progress bar counts to it (a generator's showed "0it")."""

    def __init__(self, batches, tapes):
        self.batches, self.tapes = batches, tapes

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch, tape in zip(self.batches, self.tapes):
            with tape:
                yield batch
