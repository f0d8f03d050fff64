"""k-means weight sharing (Deep Compression) for HAQ: clustering (kmeans.py), weight-shared
layers and policies (layers.py, policy.py), honest model size (size.py), packed export (pack.py)."""
from lib.quant.kmeans import KMeansCache, kmeans_1d, uniform_codebook
from lib.quant.layers import (LayerInfo, dequantize, is_quantized_layer, list_quantizable,
                              quantize_model)
from lib.quant.policy import called_layers, first_and_last, keep_first_last, uniform_policy

__all__ = ["KMeansCache", "LayerInfo", "called_layers", "dequantize", "first_and_last",
           "is_quantized_layer", "keep_first_last", "kmeans_1d", "list_quantizable",
           "quantize_model", "uniform_codebook", "uniform_policy"]
