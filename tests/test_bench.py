"""bench/run.py --quick: every section runs at tiny sizes and writes positive figures under the
keys it documents, with the settings behind them; the HAQ episode's fast path scores a policy
as the reference does; the bench sets no environment of its own."""
import json
import os
import platform
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = [f"{prefix}_{suffix}"
           for prefix in ("pt_tiny_train", "pt_default_train", "pt_tiny_eval", "pt_default_eval",
                          "pct_train", "pct_eval")
           for suffix in ("shapes_per_s", "reference_shapes_per_s", "speedup",
                          "bf16_shapes_per_s", "bf16_reference_shapes_per_s", "bf16_speedup",
                          "bf16_vs_fp32")]
FIGURES += ["haq_episode_tiny_s", "haq_episode_tiny_cold_s", "haq_episode_tiny_reference_s",
            "haq_episode_tiny_reference_cold_s", "haq_episode_tiny_speedup", "s3dis_room_s", "s3dis_room_peak_gib",
            "s3dis_room_reference_s", "s3dis_room_reference_peak_gib", "s3dis_room_speedup"]


def run_bench(*flags, env=None):
    return subprocess.run([sys.executable, os.path.join("bench", "run.py"), *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)


def test_quick_run_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["POINT_HAQ_KEEP_FREED"] = "1"
    done = run_bench("--quick", "--json", str(out), "--data-root", str(tmp_path / "parts"),
                     env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    on_cpu = results["machine"]["device"] == "cpu"
    for key in FIGURES:
        assert isinstance(results[key], float) and results[key] > 0, key
    # the settings of every figure, for timing other implementations alike
    pt = results["details"]["train"]["settings"]["pt_tiny_train"]
    assert pt["batch"] == 2 and pt["points"] == 256 and pt["widths"] == [16, 32, 64, 128]
    assert pt["threads"] >= 1 and pt["dtypes"] == ["fp32", "bf16"]
    assert results["details"]["room"]["settings"]["points"] == 4096
    assert set(results["targets"]) == {"pt_tiny_train_speedup", "pt_default_train_speedup",
                                       "haq_episode_tiny_s", "s3dis_room_peak_gib"}
    assert results["command"].startswith(os.path.join("bench", "run.py") + " --quick")
    assert results["machine"]["env"]["OMP_WAIT_POLICY"] is None  # training's setting: none
    # and the scripts' heap (lib/heap.py): freed memory kept on a glibc CPU run
    assert results["keep_freed_memory"] == (on_cpu and platform.libc_ver()[0] == "glibc")
    haq = results["details"]["haq"]["tiny"]
    assert len(haq["warm_s"]) == 3 and haq["kmeans_cache"]["hits"] >= 3 * haq["layers"]
    if on_cpu:  # same arithmetic; on CUDA the fast path's bf16 may move the score
        assert haq["ins_miou_fast"] == pytest.approx(haq["ins_miou_reference"], abs=1e-9)
    room = results["details"]["room"]["runs"]
    assert room["fast"]["logits"] == [1, 4096, 13]
    assert room["fast"]["peak_gib"] >= room["fast"]["before_inference_gib"] > 0


def test_heap_bench_times_both_modes(tmp_path):
    """bench/heap.py, one small configuration, one round: each mode in its own process, the
    kept one with malloc's settings changed and the plain one without."""
    out = tmp_path / "heap.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join("bench", "heap.py"), "--json", str(out),
                           "--configs", "pt_seg_tiny_b16", "--warmup", "0", "--steps", "1",
                           "--rounds", "1", "--data-root", str(tmp_path / "parts")],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(out.read_text())["configs"]["pt_seg_tiny_b16"]
    glibc = platform.libc_ver()[0] == "glibc"
    assert [run["kept"] for run in runs["plain"] + runs["kept"]] == [False, glibc]
    for run in runs["plain"] + runs["kept"]:
        assert len(run["seconds"]) == 1 and run["median_s"] > 0 and run["peak_rss_gib"] > 0


def test_json_flag_is_required():
    done = run_bench("--quick")
    assert done.returncode != 0 and "bench/run.py: --json OUT is required" in done.stderr


def test_step_breakdown_splits_a_small_step(tmp_path):
    """bench/step_breakdown.py at a small size: every part of the step timed, the geometry
    calls found, and a peak memory for both paths."""
    out = tmp_path / "breakdown.json"
    done = subprocess.run([sys.executable, os.path.join("bench", "step_breakdown.py"),
                           "--batch-size", "2", "--num-points", "512", "--steps", "1",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    for label in ("live", "geometry_replayed"):
        assert all(results[label][part] > 0 for part in ("forward_ms", "backward_ms"))
    # the tiny PT samples in each of its 3 TransitionDowns (distinct shapes, so 3 keys)
    assert sum(key.startswith("farthest") for key in results["geometry_ms"]) == 3
    assert results["peak_gib_reference"] > 0 and results["peak_gib_auto"] > 0


def test_graph_step_bench_times_both_paths(tmp_path):
    """bench/graph_step.py at a small size: the fast and the reference step, eager everywhere
    and also replayed on CUDA, with the equivalence check there."""
    out = tmp_path / "graphs.json"
    done = subprocess.run([sys.executable, os.path.join("bench", "graph_step.py"), "--quick",
                           "--models", "tiny", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    on_cuda = results["machine"]["device"] == "cuda"
    paths = ["eager", "reference_eager"] + (["graphed", "reference_graphed"] if on_cuda else [])
    for dtype in ("fp32", "bf16"):
        timing = results["details"][f"pt_tiny_train_{dtype}"]["paths"]
        assert sorted(timing) == sorted(paths)
        assert all(timing[path]["shapes_per_s"] > 0 for path in paths)
        assert results["figures"][f"pt_tiny_train_{dtype}_eager_speedup"] > 0
    if on_cuda:
        check = results["details"]["pt_tiny_equivalence_fp32"]
        assert check["graphed"]["loss_rel_gap"] < 1e-3


def test_gemm_share_counts_a_linear_layers_three_products():
    """bench/gemm_share.py's timer sees the forward product and the backward's two, and counts
    their floating-point operations from the operands' shapes."""
    import torch
    sys.path.insert(0, REPO)
    from bench.gemm_share import GEMMS, OpTimer, gemm_flops
    layer, x = torch.nn.Linear(5, 7), torch.randn(11, 5, requires_grad=True)
    timer = OpTimer()
    with timer:
        layer(x).sum().backward()
    products = [key for key in timer.calls if key[0] in GEMMS]
    assert sum(timer.calls[key] for key in products) == 3
    assert sum(gemm_flops(*key) * timer.calls[key] for key in products) == 3 * 2 * 11 * 5 * 7


def test_gemm_share_bench_writes_the_share_of_each_model(tmp_path):
    out = tmp_path / "gemm.json"
    done = subprocess.run([sys.executable, os.path.join("bench", "gemm_share.py"), "--quick",
                           "--steps", "1", "--data-root", str(tmp_path / "parts"),
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["square_gemm_gflops"] > 0
    assert set(results["models"]) == {"pt_seg_tiny", "pct_cls"}
    for figures in results["models"].values():
        assert 0 < figures["gemm_ms"] <= figures["op_ms"]
        assert figures["gemm_gflop"] > 0 and figures["settings"]["dtype"] == "fp32"
        assert figures["most_any_implementation_gains"] == pytest.approx(
            figures["step_ms"] / figures["gemm_ms"])
    # the PT's layers run C kernels (where a compiler is)
    from lib.ops import native
    kernels = results["models"]["pt_seg_tiny"]["c_kernels"]
    if native.library() is not None:
        assert {"pt_relation_forward", "pt_aggregate_backward", "nrl_backward_sums"} <= set(kernels)
        assert results["models"]["pt_seg_tiny"]["c_kernel_ms"] == pytest.approx(
            sum(kernels.values()))
    else:
        assert kernels == {}
