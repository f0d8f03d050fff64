"""The training step's forward, loss and backward replayed as one CUDA graph per batch shape.

On a GPU the Point Transformer's step is bound by the host, not the device: Python, autograd
and the launch of several thousand small kernels take longer than the kernels themselves
(bench/RESULTS.md: 197 ms of CPU time against 37 ms of kernel time over 3 tiny-PT steps on an
H100). A CUDA graph records those launches once and replays them with one call. Everything
the step computes is the same kernels on the same data, so a graphed run trains as the eager
one does (bench/graph_step.py and tests/test_cuda_graphs.py compare them).

What a replay needs, and how it is arranged here:
- static inputs: each batch is copied into tensors the graph reads; the loss, the logits and
  every parameter's gradient are tensors the graph writes, overwritten by the next replay.
- no host synchronisation and no host-side decisions on data inside the step: true of the
  CUDA path of lib.ops (FPS in one Triton launch, kNN by GEMM and topk, no index checks on
  CUDA tensors). A step that breaks this fails its capture; that batch shape then trains
  eagerly, with a one-line warning.
- lazy set-up (cuBLAS handles, Triton compilation) before capture: WARMUP_STEPS eager passes
  on a side stream, whose BatchNorm statistics and CUDA random state are put back afterwards
  and whose gradients are dropped, so the run's state is as if they had not happened.
- autocast without its weight-cast cache, which would hand one capture's tensors to another.
The optimizer and the scheduler stay outside the graph: they read the gradients the replay
left in `.grad` and step as usual (checkpoints, resume and learning-rate schedules unchanged).
One process only: under torchrun DDP's gradient all-reduce would have to be captured too. The
graph's memory pool holds the step's activations between replays (evaluation allocates beside
it), hence --no-cuda-graphs.
"""
import warnings

import torch

from lib.tasks import model_inputs

MAX_GRAPHS = 2  # batch shapes captured per run; training drops a short last batch, so one
WARMUP_STEPS = 2


def wanted(flag, device, world_size):
    """Whether training replays CUDA graphs. flag: None (the scripts' default) where they apply,
    a single CUDA process; True requires them (a one-line error where they cannot run); False
    never."""
    if flag is False:
        return False
    if device.type != "cuda" or world_size > 1:
        if flag:
            where = "a CUDA device" if device.type != "cuda" else "one process (not torchrun)"
            raise ValueError(f"--cuda-graphs needs {where}; drop it or pass --no-cuda-graphs")
        return False
    return True


def _signature(batch):
    return tuple(sorted((key, tuple(value.shape), value.dtype) for key, value in batch.items()
                        if torch.is_tensor(value)))


class GraphedTrainStep:
    """step(batch) -> (loss, logits) of the batch, with every parameter's gradient in `.grad`
    (written, not accumulated), or None when this batch shape trains eagerly (the caller's
    usual forward and backward). The returned tensors belong to the graph: read them before
    the next call. autocast: a context factory, e.g. lib.train.autocast with its cache off."""

    def __init__(self, model, loss_fn, task, autocast):
        self.model, self.loss_fn, self.task, self.autocast = model, loss_fn, task, autocast
        self.captures = {}  # batch signature -> _Capture, or None: this shape trains eagerly

    def __call__(self, batch):
        key = _signature(batch)
        if key not in self.captures:
            captured = sum(capture is not None for capture in self.captures.values())
            self.captures[key] = self._capture(batch) if captured < MAX_GRAPHS else None
        capture = self.captures[key]
        return None if capture is None else capture.replay(batch)

    def _capture(self, batch):
        try:
            return _Capture(self.model, self.loss_fn, self.task, self.autocast, batch)
        except RuntimeError as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            warnings.warn(f"lib/cuda_graphs.py: the training step could not be captured as a "
                          f"CUDA graph ({message}); batches of this shape train eagerly",
                          stacklevel=3)
            for param in self.model.parameters():
                param.grad = None
            return None


class _Capture:
    """One batch shape's graph and the static tensors it reads and writes."""

    def __init__(self, model, loss_fn, task, autocast, batch):
        self.inputs = {key: value.clone() for key, value in batch.items() if torch.is_tensor(value)}
        static_batch = dict(batch, **self.inputs)
        params = [param for param in model.parameters() if param.requires_grad]

        def step():
            with autocast():
                logits = model(*model_inputs(static_batch, task))
                loss = loss_fn(logits, static_batch)
            loss.backward()
            return loss, logits

        saved = [buffer.clone() for buffer in model.buffers()]
        generator = torch.cuda.get_rng_state()  # the warm-up's Dropout masks are drawn again

        def restore_buffers():  # the BatchNorm statistics as they were before the warm-up
            with torch.no_grad():
                for value, buffer in zip(saved, model.buffers()):
                    buffer.copy_(value)

        stream = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    for param in params:
                        param.grad = None
                    step()
            stream.wait_stream(side)
            restore_buffers()
            torch.cuda.set_rng_state(generator)
            for param in params:
                param.grad = None  # backward in the capture allocates them from the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                loss, logits = step()
        except BaseException:
            # a failed capture may leave its stream current (graph.__exit__ raises before it
            # restores the stream) and the warm-up's statistics in place
            torch.cuda.set_stream(stream)
            restore_buffers()
            raise
        # Detached, the captured autograd graph is freed (its memory stays the graph's): kept,
        # it would hold the capture stream's gradient-accumulation nodes, which an eager step
        # of the same model would then reuse from another stream.
        self.loss, self.logits = loss.detach(), logits.detach()
        self.grads = [(param, param.grad) for param in params if param.grad is not None]

    def replay(self, batch):
        for key, static in self.inputs.items():
            static.copy_(batch[key], non_blocking=True)
        self.graph.replay()
        for param, grad in self.grads:  # an eager step in between may have replaced them
            param.grad = grad
        return self.loss, self.logits
