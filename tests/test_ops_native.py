"""lib/ops/native.py and the checks in front of the C kernels: a bad input, a bad cache or a
changed C signature is a one-line error or a rebuild, never a crash or silent corruption.

The build tests compile a one-function probe instead of the kernels (the same code path, in
well under a second)."""
import ast
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from lib import ops
from lib.ops import dispatch, native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
#include <stdint.h>
/* out[i] = x[i] + 1 */
int add_one(int threads, int64_t n, const float *x, float *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = x[i] + 1.0f;
    return threads > 0 ? 0 : -3;
}
"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A probe source, and a private cache folder for its builds."""
    source = tmp_path / "probe.c"
    source.write_text(PROBE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return str(source)


def needs_cc():
    if subprocess.run(["sh", "-c", "command -v cc"], capture_output=True).returncode:
        pytest.skip("no C compiler")


def load_probe(path, source):
    kernels = native.Kernels(path, sources=[source])
    x = torch.arange(5, dtype=torch.float32)
    out = torch.empty(5)
    assert kernels.call("add_one", n=5, x=x, out=out) == 0
    return out


def test_a_probe_builds_loads_and_runs_with_the_umasks_permissions(probe):
    needs_cc()
    path = native.build("cc", sources=[probe], headers=[], name="probe")
    assert torch.equal(load_probe(path, probe), torch.arange(1, 6, dtype=torch.float32))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o777 & ~umask  # not mkstemp's 0600
    assert stat.S_IMODE(os.stat(path + ".sha256").st_mode) == 0o666 & ~umask


def test_a_truncated_cached_library_is_rebuilt_with_one_warning(probe):
    needs_cc()
    path = native.build("cc", sources=[probe], headers=[], name="probe")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)  # what a full disk or a killed copy leaves
    with pytest.warns(UserWarning) as caught:
        assert native.build("cc", sources=[probe], headers=[], name="probe") == path
    assert len(caught) == 1 and "incomplete or changed" in str(caught[0].message)
    assert "\n" not in str(caught[0].message)
    assert os.path.getsize(path) == size
    assert torch.equal(load_probe(path, probe), torch.arange(1, 6, dtype=torch.float32))


def test_two_processes_building_at_once_compile_once(probe, tmp_path):
    """The second process asks while the first compiles, however far apart they start: the
    compiler holds the first build until both processes have come to the build's lock (each
    says so in `waiting/`), so the second one reaches it during that build. (A compiler that
    only took a second left it to the two starts to overlap: under load, one process could
    import torch a second after the other and find the library built.)"""
    needs_cc()
    log, waiting = tmp_path / "compiles.log", tmp_path / "waiting"
    waiting.mkdir()
    compiler = tmp_path / "waiting-cc"
    # logs each compilation; waits (at most 2 minutes) for both processes at the lock
    compiler.write_text(f'#!/bin/sh\ncase "$1" in --version) exec cc "$@";; esac\n'
                        f'echo compile >> {log}\n'
                        f'for i in $(seq 1200); do\n'
                        f'    [ "$(ls {waiting} | wc -l)" -ge 2 ] && break; sleep 0.1\n'
                        f'done\nexec cc "$@"\n')
    compiler.chmod(0o755)
    script = textwrap.dedent(f"""
        import os
        from lib.ops import native
        locked = native._locked
        def announced(path):
            open(os.path.join({str(waiting)!r}, str(os.getpid())), "w").close()
            return locked(path)
        native._locked = announced
        print(native.build({str(compiler)!r}, sources=[{probe!r}], headers=[], name="probe"))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert len(os.listdir(waiting)) == 2  # both came to the lock: the second during the build
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1 and native._verified(paths.pop())
    assert log.read_text().split() == ["compile"]


def test_collecting_the_tests_compiles_nothing(tmp_path):
    """Tests ask for the kernels when they run, never at collection (a skipif that built them
    made `pytest --collect-only` compile, and every xdist worker with it)."""
    log = tmp_path / "compiles.log"
    compiler = tmp_path / "logging-cc"
    compiler.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec cc "$@"\n')
    compiler.chmod(0o755)
    env = dict(os.environ, CC=str(compiler), XDG_CACHE_HOME=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    env.pop("POINT_HAQ_NATIVE", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "tests"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]
    assert not log.exists(), log.read_text()


def test_an_unwritable_cache_falls_back_to_the_temporary_folder(probe, tmp_path, monkeypatch):
    needs_cc()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # makedirs below a file fails
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = native.build("cc", sources=[probe], headers=[], name="probe")
    assert path.startswith(str(tmp_path / "tmp")) and native._verified(path)


def process_state(pid):
    """A process's state letter (R, S, Z, ...) from Linux's /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_a_hanging_compiler_times_out_and_the_pytorch_forms_serve(tmp_path, monkeypatch):
    """The compiler and its children are killed (a driver's hung cc1 holds the pipes open).
    The compiler's child here holds them for 60 s, then leaves a file: killed with the compiler,
    it is gone when library() returns and the file never comes; a compiler killed alone left
    it running (and library() waited for it, or returned with it still alive)."""
    pid, survived = tmp_path / "child.pid", tmp_path / "survived"
    compiler = tmp_path / "hanging-cc"
    compiler.write_text(f'#!/bin/sh\ncase "$1" in --version) echo hang;; *)\n'
                        f'    (sleep 60; touch {survived}) & echo $! > {pid}; wait;; esac\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.delenv("POINT_HAQ_NATIVE", raising=False)  # the suite may run with it at 0
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "COMPILE_TIMEOUT_S", 1)
    monkeypatch.setattr(native, "_library", native._UNSET)
    with pytest.warns(UserWarning, match="timed out"):
        assert native.library() is None
    assert not survived.exists()  # killed, not waited for
    # and not left running: gone, or a zombie its new parent has yet to reap
    assert process_state(int(pid.read_text())) in (None, "Z")
    assert list((tmp_path / "cache").rglob("*.so")) == []


def test_prototypes_are_read_from_every_exported_c_function():
    found = native.prototypes()
    assert set(found) == {"pt_relation_forward", "pt_relation_backward", "pt_aggregate_forward",
                          "pt_aggregate_backward", "nrl_stats", "nrl_forward",
                          "nrl_backward_sums", "nrl_backward_input", "neighbour_max_forward",
                          "neighbour_max_backward", "norm_max_backward", "gathered_max_forward",
                          "pt_attention_inference", "fps", "knn", "pe_stats", "pe_forward",
                          "pe_backward_sums", "aw_forward", "aw_backward_sums",
                          "aw_backward_input", "gather_rows_backward"}
    restype, params = found["pt_aggregate_forward"]
    assert [name for name, _ in params] == ["dtype", "threads", "B", "N", "K", "C", "W", "w", "v",
                                            "delta", "idx", "out"]
    assert restype is not None  # every kernel returns a status


def _dict_keywords(tree):
    """{name: keyword names} of every `name = dict(...)` under `tree`."""
    return {node.targets[0].id: {k.arg for k in node.value.keywords}
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "dict"}


def _kernel_calls(path):
    """(kernel name, keyword names) of every `run_kernel(lib, "name", ...)` / `.call("name", ...)`,
    a `**given` resolved through the module's `given = dict(...)`, a `**f(...)` through the
    one `dict(...)` that the module's function f builds (and returns, in some form)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    dicts = _dict_keywords(tree)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}

    def built_by(function):
        """The keywords of the dict(...) that `function` builds, or else that the one module
        function it calls builds (a function that keeps another's result, lib/ops/attention.py)."""
        found = _dict_keywords(functions[function])
        if found:
            (built,) = found.values()
            return built
        (callee,) = {call.func.id for call in ast.walk(functions[function])
                     if isinstance(call, ast.Call) and getattr(call.func, "id", None) in functions}
        return built_by(callee)

    def unpacked(value):
        if isinstance(value, ast.Call):
            return built_by(value.func.id)
        return dicts[value.id]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        args = [a for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if name in ("run_kernel", "call") and args:
            keywords = set()
            for k in node.keywords:
                keywords |= {k.arg} if k.arg is not None else unpacked(k.value)
            yield args[0].value, keywords


@pytest.mark.parametrize("module,least", [("fused.py", 2), ("geometry.py", 3), ("edge.py", 1),
                                           ("attention.py", 1), ("position.py", 3),
                                           ("attention_softmax.py", 3)])
def test_every_kernel_call_names_exactly_the_c_parameters(module, least):
    """The Python side of each call, checked against the C definitions without compiling: a
    parameter added, renamed or dropped in C fails here (and at run time, in Kernels.call)."""
    found = native.prototypes()
    calls = list(_kernel_calls(os.path.join(ROOT, "lib", "ops", module)))
    assert len(calls) >= least
    for kernel, keywords in calls:
        params = {name for name, _ in found[kernel][1]} - {"threads"}
        assert keywords - {"threads"} == params, (kernel, sorted(keywords ^ params))


def test_a_call_with_wrong_parameter_names_is_a_one_line_error(probe):
    needs_cc()
    path = native.build("cc", sources=[probe], headers=[], name="probe")
    kernels = native.Kernels(path, sources=[probe])
    with pytest.raises(TypeError, match=r"add_one\(threads, n, x, out\) called with") as err:
        kernels.call("add_one", n=5, x=torch.zeros(5), output=torch.zeros(5))
    assert "\n" not in str(err.value)


# The checks in front of the kernels

def needs_kernels():
    lib = native.library()
    if lib is None:
        pytest.skip("no C kernels")
    return lib


def attention(b=2, n=20, k=4, channels=16, width=2):
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(b, n, k, channels, generator=gen)
    rows = [torch.randn(b, n, channels, generator=gen) for _ in range(3)]
    weight = torch.randn(b, n, k, width, generator=gen)
    return delta, rows, weight, torch.randint(0, n, (b, n, k), generator=gen)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("bad", [20, -1, 39])  # 39: inside the batch's rows, not the cloud's
def test_a_corrupt_neighbour_index_is_a_one_line_error(backend, bad):
    ops.set_backend(backend)
    try:
        delta, (key, query, value), weight, idx = attention()
        idx[1, 3, 2] = bad
        for op in (lambda: ops.relation(delta, key, query, idx),
                   lambda: ops.neighbour_sum(weight, value, delta, idx, 8),
                   lambda: ops.gather(value, idx)):
            with pytest.raises(ValueError, match="neighbour index out of range") as err:
                op()
            assert "\n" not in str(err.value)
    finally:
        ops.set_backend("auto")


def test_an_index_modified_in_place_is_checked_again():
    delta, (key, query, _), _, idx = attention()
    ops.relation(delta, key, query, idx)  # checked and remembered
    idx[0, 0, 0] = 1000
    with pytest.raises(ValueError, match="out of range"):
        ops.relation(delta, key, query, idx)


def test_a_bad_channel_count_is_a_one_line_error():
    delta, (_, _, value), _, idx = attention()
    for width in (3, 4):  # 3 does not divide 16; 4 is not 16 / share_planes
        weight = torch.randn(2, 20, 4, width)
        with pytest.raises(ValueError, match="neighbour_sum of 16 channels") as err:
            ops.neighbour_sum(weight, value, delta, idx, 8)
        assert "\n" not in str(err.value)


def test_the_kernels_refuse_bad_shapes_before_touching_memory():
    """Null pointers everywhere: a kernel that read or wrote anything would crash the test."""
    lib = needs_kernels()
    sizes = dict(dtype=0, B=1, N=4, K=2, C=16)
    nulls = dict(w=None, v=None, delta=None, idx=None, out=None)
    assert lib.call("pt_aggregate_forward", W=3, **sizes, **nulls) == -3  # 3 does not divide 16
    assert lib.call("pt_aggregate_forward", W=0, **sizes, **nulls) == -3
    assert lib.call("pt_relation_forward", **dict(sizes, C=5000), delta=None, key=None, q=None,
                    idx=None, rel=None) == -3  # wider than the stack rows
    assert lib.call("fps", B=1, N=2 ** 31, m=4, xyz=None, start=None, out=None) == -3
    assert lib.call("knn", B=1, N=4, M=4, k=5, support=None, query=None, idx=None,
                    dist2=None) == -3
    with pytest.raises(ValueError, match="shapes outside what the kernel takes") as err:
        dispatch.run_kernel(lib, "nrl_forward", dtype=torch.float32, M=4, C=0, O=2, x=None,
                            scale=None, shift=None, weight=None, bias=None, out=None)
    assert "\n" not in str(err.value)


def test_with_a_compiler_the_repositorys_kernels_build():
    """A failed build only warns and the kernel tests skip, so a source that no longer compiles
    would pass unseen: where there is a C compiler (and POINT_HAQ_NATIVE is not 0), the
    repository's own kernels must build and load."""
    if shutil.which(native.compiler()) is None:  # the compiler library() would use
        pytest.skip(f"no C compiler ({native.compiler()})")
    if os.environ.get("POINT_HAQ_NATIVE", "1") == "0":
        pytest.skip("POINT_HAQ_NATIVE=0")
    assert native.library() is not None, "lib/ops/csrc did not build (see the warning)"


def test_the_suite_runs_without_a_compiler():
    """POINT_HAQ_NATIVE=0 in a fresh process: no build, and a PT training step on the PyTorch
    forms (CI without a C compiler gets the same)."""
    script = textwrap.dedent("""
        import torch
        from lib.ops import native
        from models import build_model
        model = build_model("pt_seg_tiny", in_channels=3, num_classes=4, num_categories=2)
        model(torch.randn(2, 128, 3), torch.randn(2, 128, 3), torch.tensor([0, 1])).sum().backward()
        assert native.library() is None
        print("ok")
    """)
    env = dict(os.environ, POINT_HAQ_NATIVE="0", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_python_m_lib_ops_says_what_runs_here():
    """`python -m lib.ops` (README): one line per dtype, bf16 rows included, that agrees with
    whether the kernels loaded in this process."""
    done = subprocess.run([sys.executable, "-m", "lib.ops"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    form = "C kernels" if native.library() is not None else "plain compositions"
    lines = done.stdout.splitlines()
    assert "cpu float32: FPS" in done.stdout
    assert f"cpu bfloat16 rows (autocast): PT layer ops: {form}" in lines


def test_an_index_written_behind_torchs_back_in_inference_mode_is_still_checked():
    """Inference tensors have no version counter: each call checks them (and the models run
    under torch.inference_mode, which reading that counter used to refuse)."""
    delta, (key, query, _), _, idx = attention()
    with torch.inference_mode():
        idx = idx.clone()
        ops.relation(delta, key, query, idx)
        idx[0, 0, 0] = 1000
        with pytest.raises(ValueError, match="out of range"):
            ops.relation(delta, key, query, idx)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_clouds_of_the_wrong_shape_or_not_finite_are_one_line_errors(backend):
    """The kNN and FPS kernels read three floats a point from one batch of clouds: another
    shape read past the tensors (indices that changed from run to run), a NaN gave each form
    its own neighbours."""
    gen = torch.Generator().manual_seed(0)
    support, query = torch.rand(2, 50, 3, generator=gen), torch.rand(2, 10, 3, generator=gen)
    nan = support.clone()
    nan[1, 7, 0] = float("nan")
    inf = support.clone()
    inf[0, 3, 2] = float("inf")
    ops.set_backend(backend)
    try:
        for op, match in [(lambda: ops.knn_query(4, support, query[:1]), "one batch"),
                          (lambda: ops.knn_query(4, support[..., :2], query[..., :2]), "(B, N, 3)"),
                          (lambda: ops.knn_query(4, support, torch.rand(2, 10, 4)), "(B, N, 3)"),
                          (lambda: ops.farthest_point_sample(support[..., :2], 6), "(B, N, 3)"),
                          (lambda: ops.farthest_point_sample(support[0], 6), "(B, N, 3)"),
                          (lambda: ops.knn_query(4, nan, query), "NaN or infinite"),
                          (lambda: ops.knn_query(4, support, inf[:, :10]), "NaN or infinite"),
                          (lambda: ops.farthest_point_sample(nan, 6), "NaN or infinite"),
                          (lambda: ops.farthest_point_sample(inf, 6), "NaN or infinite")]:
            with pytest.raises(ValueError, match=re.escape(match)) as err:
                op()
            assert "\n" not in str(err.value)
    finally:
        ops.set_backend("auto")


def test_operands_that_disagree_with_the_kernels_shapes_never_reach_them():
    """Each of these read past a tensor in the kernels (garbage like 1e32 or NaN, or a
    data race in gather's backward); now an error, or the plain form's own answer."""
    delta, (key, query, value), _, idx = attention()
    with pytest.raises(ValueError, match="key and query of one shape"):
        ops.relation(delta, key[..., :8], query, idx)
    with pytest.raises(ValueError, match="key and query of one shape"):
        ops.relation(delta, key, query[:1], idx)
    with pytest.raises(ValueError, match="gather from 1 clouds"):
        ops.gather(value[:1].requires_grad_(), idx)
    x = torch.randn(2, 20, 4, 16)
    for bn, linear in [(torch.nn.BatchNorm1d(16), torch.nn.Linear(8, 4)),
                       (torch.nn.BatchNorm1d(8).eval(), torch.nn.Linear(16, 4))]:
        with pytest.raises(RuntimeError):  # the plain form's: no kernel reads 16 of 8 values
            ops.norm_relu_linear(bn, linear, x)
    with pytest.raises(RuntimeError):
        ops.norm_relu_max(torch.nn.BatchNorm1d(1).eval(), x)
    # TransitionDown's inference form on a batch of one cloud with centres from two: refused
    # on both paths (the kernel read past the cloud; the plain gather broadcast)
    linear, bn = torch.nn.Linear(3 + 16, 8), torch.nn.BatchNorm1d(8).eval()
    xyz, feat = torch.rand(1, 20, 3), torch.randn(1, 20, 16)
    new_xyz, centres_idx = torch.rand(2, 6, 3), torch.randint(0, 20, (2, 6, 4))
    for backend in ("auto", "reference"):
        ops.set_backend(backend)
        try:
            with torch.no_grad(), pytest.raises(ValueError, match="gather from 1 clouds"):
                ops.group_norm_relu_max(linear, bn, xyz, feat, new_xyz, centres_idx)
        finally:
            ops.set_backend("auto")


def test_a_second_derivative_through_a_kernel_is_refused_not_wrong():
    """The kernels' backward passes build no graph: create_graph through them gave a second
    derivative without their terms (1499 where 2661 is right); now torch's own error."""
    _, _, _, idx = attention()
    value = torch.randn(2, 20, 16, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((ops.gather(value, idx) ** 2).sum(), value, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.pow(2).sum().backward()


def test_a_compilers_messages_in_another_encoding_give_the_warning(tmp_path, monkeypatch):
    compiler = tmp_path / "latin1-cc"
    compiler.write_bytes(b'#!/bin/sh\nprintf "\\351chec\\n" >&2\nexit 1\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.delenv("POINT_HAQ_NATIVE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_library", native._UNSET)
    with pytest.warns(UserWarning, match="building the C kernels"):
        assert native.library() is None


def test_a_cache_folder_others_can_write_to_is_not_used(probe, tmp_path, monkeypatch):
    """A library found there is loaded into the process: in the shared temporary folder
    another user could have made the folder, and left a library in it."""
    needs_cc()
    shared = tmp_path / "cache" / "point-transformer-haq"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = native.build("cc", sources=[probe], headers=[], name="probe")
    assert path.startswith(str(tmp_path / "tmp")) and native._verified(path)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) & 0o077 == 0  # made 0700


def test_every_kernel_catches_an_index_written_behind_torchs_back():
    """The Python check is cached by torch's version counter, which a write through `.numpy()`
    or `.data` does not move, and the indices an autograd Function saved can change before its
    backward: every kernel that reads neighbour indices checks each one as it reads it
    (csrc/parallel.h's checked_index). Without that, each case below crashes its process
    (index 2^40: segmentation fault, checked when the kernels gained it)."""
    needs_kernels()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "indices_behind_torch.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit status {run.returncode}: {run.stderr[-2000:]}"
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    kernels = {name for name, (_, params) in native.prototypes().items()
               if "idx" in {p for p, _ in params}} - {"knn"}  # knn writes its idx
    assert set(lines) == kernels  # every kernel that reads indices, each once
    for kernel, said in lines.items():
        assert said.startswith("lib/ops: neighbour index out of range: [0, 1099511627776] for "
                               f"clouds of 20 points (lib/ops/csrc: {kernel})"), said
