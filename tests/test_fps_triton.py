"""lib/ops/fps_triton.py: the one-launch GPU FPS picks what the torch loop picks.

It runs where triton runs: on a CUDA device, or on the CPU in Triton's interpreter (a subprocess
with TRITON_INTERPRET=1), and wherever triton is installed its kernels are compiled for an H100.
CPU-only installs (CI) have no triton; there only the dispatch is checked.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lib import ops
from lib.ops import dispatch, fps_triton
from lib.ops import geometry as po

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda_triton = pytest.mark.skipif(
    fps_triton.triton is None or not torch.cuda.is_available(), reason="needs CUDA and triton")


def test_auto_backend_sends_non_cpu_clouds_to_triton(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "fast_cpu", lambda *tensors: False)  # as for a CUDA tensor
    monkeypatch.setattr(fps_triton, "available", lambda xyz: True)
    monkeypatch.setattr(fps_triton, "farthest_point_sample",
                        lambda xyz, m, start: calls.append(start) or torch.zeros(1, m).long())
    xyz = torch.randn(1, 50, 3)
    assert po.farthest_point_sample(xyz, 5).shape == (1, 5)
    assert len(calls) == 1 and torch.equal(calls[0], po.start_index(xyz))
    ops.set_backend("reference")
    assert torch.equal(po.farthest_point_sample(xyz, 5), po.farthest_point_sample_reference(xyz, 5))
    assert len(calls) == 1


def test_not_available_for_cpu_tensors_outside_the_interpreter():
    if fps_triton.INTERPRETING:
        pytest.skip("TRITON_INTERPRET=1 is set")
    assert not fps_triton.available(torch.randn(1, 8, 3))


def test_split_programs_fit_the_multiprocessors(monkeypatch):
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    assert fps_triton.parts_for(1, 80000, 132) == 79  # 1,024 points a program
    assert fps_triton.parts_for(8, 24000, 132) == 16  # 8 x 16 <= 132
    assert fps_triton.parts_for(200, 9000, 132) == 1  # more clouds than SMs: one each
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "25")
    assert fps_triton.parts_for(1, 80000, 132) == 33


# The same comparisons on both devices: (B, N, m, dtype, resident_max). Clouds over
# resident_max points go to the split kernel: on CUDA in float32 over several programs per cloud
# (20 and 3 here), else (float64, many clouds, the interpreter) one, in chunks of STREAM_BLOCK.
CASES = [(4, 2048, 512, "float32", 8192), (3, 100, 1, "float32", 8192),
         (2, 1000, 1000, "float64", 8192), (2, 20000, 700, "float32", 8192),
         (2, 3000, 300, "float32", 1024), (1, 4097, 64, "float64", 1024),
         (200, 9000, 16, "float32", 8192)]

CHECK = textwrap.dedent("""
    import torch
    from lib.ops import fps_triton, geometry
    def check(device, b, n, m, dtype, resident_max):
        fps_triton.RESIDENT_MAX = resident_max
        gen = torch.Generator().manual_seed(n + m)
        xyz = torch.randn(b, n, 3, generator=gen, dtype=getattr(torch, dtype)).to(device)
        picks = fps_triton.farthest_point_sample(xyz, m, geometry.start_index(xyz))
        reference = geometry.farthest_point_sample_reference(xyz, m)
        assert picks.dtype == torch.long and picks.device == xyz.device
        assert torch.equal(picks, reference), (b, n, m, dtype, resident_max)
""")


@needs_cuda_triton
@pytest.mark.parametrize("case", CASES)
def test_cuda_fps_matches_the_reference(case, monkeypatch):
    namespace = {}
    exec(CHECK, namespace)
    monkeypatch.setattr(fps_triton, "RESIDENT_MAX", fps_triton.RESIDENT_MAX)  # restored after
    namespace["check"]("cuda", *case)


@needs_cuda_triton
@pytest.mark.parametrize("b, n, m", [(1, 80000, 20000), (8, 24000, 6000)])
def test_cuda_fps_of_rooms_is_farthest_up_to_rounding(b, n, m):
    # Thousands of steps meet near ties that a 1-ulp difference from the loop's rounding breaks
    # the other way (bench/RESULTS.md), so the check is that each pick is the farthest point.
    xyz = (torch.rand(b, n, 3) * torch.tensor([10.0, 10.0, 3.0])).cuda()
    picks = po.farthest_point_sample(xyz, m)
    assert torch.equal(picks[:, 0], po.start_index(xyz))
    assert all(len(set(row.tolist())) == m for row in picks)
    assert po.fps_shortfall(xyz, picks) < 1e-6


@needs_cuda_triton
def test_cuda_fps_on_duplicate_points_never_repeats_a_point():
    xyz = ((torch.rand(2, 4096, 3) * 12).round() / 12).cuda()
    picks = po.farthest_point_sample(xyz, 512)
    assert all(len(set(row.tolist())) == 512 for row in picks)
    assert torch.equal(picks[:, 0], po.start_index(xyz))


def interpreter_usable():
    """Triton's interpreter (3.6) calls int() on 1-element arrays, an error from numpy 2.4."""
    return (fps_triton.triton is not None
            and np.lib.NumpyVersion(np.__version__) < "2.4.0")


@pytest.mark.skipif(not interpreter_usable(), reason="needs triton (and numpy < 2.4)")
def test_interpreted_fps_matches_the_reference():
    # Small cases: the interpreter runs each lane in numpy.
    cases = [(2, 300, 40, "float32", 8192), (1, 100, 100, "float64", 8192),
             (3, 17, 1, "float32", 8192), (2, 300, 40, "float32", 64), (1, 130, 9, "float64", 64)]
    script = CHECK + "fps_triton.STREAM_BLOCK = 32\n" + "".join(
        f"check('cpu', *{case!r})\n" for case in cases) + "print('checked')"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "checked" in done.stdout, done.stderr[-3000:]


@pytest.mark.skipif(fps_triton.triton is None, reason="needs triton")
@pytest.mark.parametrize("kernel, constants", [
    ("_fps_resident", {"BLOCK": 2048}),
    ("_fps_split", {"SPLIT": True, "BLOCK": 1024}),
    ("_fps_split", {"SPLIT": False, "BLOCK": 4096})])
def test_kernels_compile_for_an_h100_without_one(kernel, constants):
    # Triton compiles ahead of time for a named GPU with the ptxas it ships: the split kernel's
    # atomics and wait loop are checked here even where nothing can run them.
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    pointers = {"xyz_ptr": "*fp32", "dist_ptr": "*fp32", "start_ptr": "*i64",
                "picks_ptr": "*i64", "keys_ptr": "*i64", "arrivals_ptr": "*i32"}
    fn = getattr(fps_triton, kernel)
    signature = {name: pointers.get(name, "i32") for name in fn.arg_names}
    signature.update(dict.fromkeys(constants, "constexpr"))
    compiled = fps_triton.triton.compile(
        ASTSource(fn, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4, "enable_fp_fusion": False})
    assert compiled.asm["cubin"]
    atomics = [line for line in compiled.asm["ptx"].splitlines() if "atom." in line]
    assert bool(atomics) == constants.get("SPLIT", False)
