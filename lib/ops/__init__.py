"""Point-cloud operations and the Point Transformer layer's fused operations, in one package.

Models call these and nothing below them; each has a plain PyTorch form that runs anywhere and,
where it pays, a faster form (C kernels for CPU tensors, Triton / GEMM forms for CUDA ones).
lib/ops/dispatch.py is the one place that says which form runs and why.

  geometry.py    FPS, kNN, gather, group, interpolate (+ their reference and CPU / CUDA forms)
  tape.py        GeometryTape: a fixed batch's FPS and kNN replayed (HAQ's search subset)
  edge.py        edge_linear, group_linear: Linears on grouped neighbourhoods (PCT's neighbour
                 embedding, PT's TransitionDown), computed on points, not pairs;
                 group_norm_relu_max: TransitionDown's LBR + max-pool
  attention.py   attention_inference: the PT layer's whole attention per point (C kernel),
                 for inference
  attention_softmax.py  attention_weights: gamma's end and the softmax over the
                 neighbours (C kernel)
  fused.py       relation, neighbour_sum, norm_relu_linear, neighbour_max, norm_relu_max
                 (C kernels), relu_neighbour_max
  position.py    position_encoding: the PT layer's delta = theta(p_i - p_j) (C kernel)
  layers.py      batch_norm, mlp (PyTorch re-formulations for few channels)
  native.py      builds, verifies and loads csrc/ (C kernels) and calls them by parameter name
  fps_triton.py  one-launch FPS on CUDA
"""
from lib.ops.attention import attention_inference
from lib.ops.attention_softmax import attention_weights
from lib.ops.dispatch import get_backend, set_backend
from lib.ops.geometry import (farthest_point_sample, gather, group, interpolate, knn_query,
                              start_index)
from lib.ops.edge import edge_linear, group_linear, group_norm_relu_max
from lib.ops.fused import (neighbour_max, neighbour_sum, norm_relu_linear, norm_relu_max,
                           relation, relu_neighbour_max)
from lib.ops.layers import batch_norm, mlp
from lib.ops.position import position_encoding
from lib.ops.tape import GeometryTape

__all__ = ["GeometryTape", "attention_inference", "attention_weights", "batch_norm",
           "edge_linear", "farthest_point_sample", "gather", "get_backend", "group",
           "group_linear", "group_norm_relu_max", "interpolate", "knn_query", "mlp",
           "neighbour_max", "neighbour_sum", "norm_relu_linear", "norm_relu_max",
           "position_encoding", "relation", "relu_neighbour_max", "set_backend", "start_index"]
