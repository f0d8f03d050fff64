"""Clustering speed and quality: our sorted 1-D k-means (lib/quant/kmeans.py) against
scikit-learn's KMeans on every quantizable layer of the default Point Transformer part
segmentation model, at one bit width.

scikit-learn is run with its defaults (k-means++, n_init 'auto' = 1, max_iter 300, all cores),
with max_iter=3 as HAQ's search used it, and with its defaults on one thread (threadpoolctl):
ours runs on one thread (numpy), and on a busy machine OpenMP's waiting threads can make the
default many times slower, so the one-thread figure is the like-for-like one (`like_for_like`
in the JSON names it). Time is wall-clock per layer (best of --repeats), SSE the sum of squared
weight errors in float64, `worst_layer_sse_ratio_vs_*` the layer where ours compares worst.
Random-init weights by default; --ckpt takes a trained checkpoint's.

    python bench/quant.py --json bench/quant.json
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib.quant.kmeans import kmeans_1d  # noqa: E402
from lib.quant.layers import named_quantizable  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--model", default="pt_seg")
    p.add_argument("--ckpt", default=None, help="take the weights of this checkpoint")
    p.add_argument("--repeats", type=int, default=1, help="timing: best of this many runs")
    p.add_argument("--device", default="cpu", help="device of our k-means (sklearn is CPU)")
    p.add_argument("--limit", type=int, default=None, help="only the first N layers (quick look)")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def layer_weights(args):
    """[(name, weight tensor)] and a note on where the weights came from."""
    if args.ckpt:
        from lib.checkpoint import load_checkpoint
        _, model, _ = load_checkpoint(args.ckpt)
        source = f"trained weights of {args.ckpt}"
    else:
        from models import build_model
        torch.manual_seed(0)
        model = build_model(args.model, in_channels=3, num_classes=50, num_categories=16)
        source = f"random-init {args.model}(in_channels=3, num_classes=50, num_categories=16)"
    layers = [(name, m.weight.detach().clone()) for name, m in named_quantizable(model)]
    return layers[:args.limit], source


def sse(weights, codebook, indices):
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    c = torch.as_tensor(codebook, dtype=torch.float64)
    return float(((w - c[torch.as_tensor(indices).reshape(-1).long()]) ** 2).sum())


def sse_ratio(ours, theirs):
    """ours / theirs, where both are 0 on a layer with no more distinct weights than clusters."""
    if theirs > 0:
        return ours / theirs
    return 1.0 if ours == 0 else float("inf")


def timed(fn, repeats):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def ours(weight, bits, device):
    def run():
        codebook, indices = kmeans_1d(weight.to(device), bits)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return codebook.cpu(), indices.cpu()
    return run


def sklearn(weight, bits, threads=None, **kwargs):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
    x = weight.reshape(-1, 1).numpy()

    def run():
        with threadpool_limits(threads):
            km = KMeans(n_clusters=min(2 ** bits, len(np.unique(x))), random_state=0,
                        **kwargs).fit(x)
        return km.cluster_centers_[:, 0], km.labels_
    return run


def main(args):
    device = torch.device(args.device)
    layers, source = layer_weights(args)
    methods = {"ours": lambda w: ours(w, args.bits, device),
               "sklearn": lambda w: sklearn(w, args.bits),
               "sklearn_max_iter3": lambda w: sklearn(w, args.bits, max_iter=3),
               "sklearn_1thread": lambda w: sklearn(w, args.bits, threads=1)}
    if device.type == "cuda":  # warm-up: CUDA context and kernels
        kmeans_1d(layers[0][1].to(device), args.bits)
    rows = []
    for name, weight in layers:
        row = {"layer": name, "n": weight.numel()}
        for method, make in methods.items():
            seconds, (codebook, indices) = timed(make(weight), args.repeats)
            row[method] = {"seconds": seconds, "sse": sse(weight, codebook, indices),
                           "clusters": len(codebook)}
        rows.append(row)
        print(f"{name:<45} n={row['n']:>8} " + " ".join(
            f"{m} {row[m]['seconds']:.3f}s sse {row[m]['sse']:.4g}" for m in methods), flush=True)
    total = {m: {key: sum(r[m][key] for r in rows) for key in ("seconds", "sse")} for m in methods}
    result = {"like_for_like": "speedup_vs_sklearn_1thread: both on one thread"}
    for method, suffix in (("sklearn", ""), ("sklearn_max_iter3", "_max_iter3"),
                           ("sklearn_1thread", "_1thread")):
        result["speedup_vs_sklearn" + suffix] = total[method]["seconds"] / total["ours"]["seconds"]
        result["sse_ratio_vs_sklearn" + suffix] = total["ours"]["sse"] / total[method]["sse"]
        worst = max(rows, key=lambda r: sse_ratio(r["ours"]["sse"], r[method]["sse"]))
        result["worst_layer_sse_ratio_vs_sklearn" + suffix] = {
            "layer": worst["layer"], "ratio": sse_ratio(worst["ours"]["sse"], worst[method]["sse"])}
    result.update({
        "layers_where_ours_has_higher_sse": sum(
            r["ours"]["sse"] > r["sklearn"]["sse"] * (1 + 1e-9) for r in rows),
        "bits": args.bits, "weights": source, "n_layers": len(rows),
        "n_weights": sum(r["n"] for r in rows), "totals": total, "device": str(device),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "layers": rows,
    })
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
