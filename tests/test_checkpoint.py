import os

import pytest
import torch

from lib.checkpoint import atomic_write, load_checkpoint, save_checkpoint, torch_save_atomic
from models import build_model

KWARGS = {"in_channels": 3, "num_classes": 5}


def meta():
    return {"model": {"name": "pt_cls_tiny", "kwargs": KWARGS}, "dataset": {"name": "x"},
            "args": {"lr": 0.1, "out": None}, "quant": None}


def test_round_trip_restores_weights_and_metadata(tmp_path):
    model = build_model("pt_cls_tiny", **KWARGS)
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, meta(), resume_state={"epoch": 3})
    loaded_meta, loaded, resume = load_checkpoint(path)
    assert loaded_meta["args"] == {"lr": 0.1, "out": None}
    assert resume == {"epoch": 3}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_saved_from_ddp_like_wrapper_has_no_prefix(tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, Wrapper(build_model("pt_cls_tiny", **KWARGS)), meta())
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not any(k.startswith("module.") for k in state)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_truncated_or_foreign_file_is_one_line_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:  # a real checkpoint cut in half
        save_checkpoint(str(path), build_model("pt_cls_tiny", **KWARGS), meta())
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_checkpoint(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    # in words, not a zip reader's errno or an unpickler's byte
    assert {b"": "an empty file", None: "truncated or damaged"}.get(
        content, "not a file torch.save wrote") in str(err.value)


def test_a_torch_file_holding_other_objects_says_so(tmp_path):
    import argparse
    path = tmp_path / "pickled.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, str(path))
    with pytest.raises(ValueError, match="holds Python objects other than tensors") as err:
        load_checkpoint(str(path))
    assert "weights_only=False" not in str(err.value)  # torch's advice, which is not for us


def test_foreign_torch_file_and_missing_file(tmp_path):
    path = str(tmp_path / "other.pt")
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a checkpoint of this repository"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "f.pt")
    torch_save_atomic({"v": 1}, path)

    def fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert os.listdir(tmp_path) == ["f.pt"]


class FakeGPUs:
    """torch.cuda's generator functions on a machine with `n` GPUs, this process using
    `current`; a GPU that is not there is torch's IndexError (default_generators[idx])."""

    def __init__(self, n, current=0):
        self.states = [torch.tensor([i], dtype=torch.uint8) for i in range(n)]
        self.current = current

    def index(self, device):
        return self.current if device == "cuda" else device

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "get_rng_state",
                            lambda device="cuda": self.states[self.index(device)].clone())
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(cuda, "set_rng_state", self.set)
        monkeypatch.setattr(cuda, "set_rng_state_all",
                            lambda states: [self.set(s, i) for i, s in enumerate(states)])

    def set(self, state, device="cuda"):
        self.states[self.index(device)] = state.clone()


def test_a_resume_sets_the_generator_of_the_gpu_it_uses(monkeypatch):
    """Every visible GPU's generator was saved and set back: a run saved where two GPUs were
    visible stopped, resumed where one is (another machine, CUDA_VISIBLE_DEVICES), with torch's
    IndexError; and under torchrun rank 1 set its GPU's generator to GPU 1's state as rank 0
    had it (never drawn from)."""
    from lib.checkpoint import rng_state, set_rng_state
    saved_on = FakeGPUs(2)
    saved_on.install(monkeypatch)
    saved_on.states[0] = torch.tensor([7], dtype=torch.uint8)  # the run drew on GPU 0
    saved = rng_state()
    for machine in (FakeGPUs(1), FakeGPUs(2, current=1)):  # one GPU; torchrun's rank 1
        machine.install(monkeypatch)
        set_rng_state(saved)
        assert machine.states[machine.current].item() == 7


def test_a_folder_a_checkpoint_cannot_be_written_in_is_an_error_naming_the_file(tmp_path,
                                                                               monkeypatch):
    """A read-only run folder: the temporary file cannot be made (simulated: the tests may run
    as root, whom permissions do not stop); the error names the checkpoint, not its temporary,
    and the file there before stays."""
    import tempfile
    from lib.checkpoint import atomic_write
    path = tmp_path / "last.pt"
    path.write_bytes(b"before")

    def denied(dir, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, ".tmp-xyz"))
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OSError) as err:
        atomic_write(str(path), lambda tmp: None)
    assert err.value.filename == str(path)
    assert err.value.strerror == "not written (Permission denied); the file there before is kept"
    assert path.read_bytes() == b"before"


def test_a_folder_or_a_search_state_given_as_the_checkpoint_says_what_it_is(tmp_path):
    """eval.py --ckpt RUN (the run folder for its best.pt) was refused as 'no such checkpoint
    file', and a search_state.pt as 'not a checkpoint of this repository'."""
    from lib.checkpoint import checkpoint_meta
    from lib.experiment import load_on_every_rank
    run = tmp_path / "pretrain"
    save_checkpoint(str(run / "best.pt"), build_model("pt_cls_tiny", **KWARGS), meta())
    for load in (load_checkpoint, checkpoint_meta, load_on_every_rank):
        with pytest.raises(ValueError, match=f"^{run}: a folder, not a checkpoint file; it holds "
                                             f"best.pt: give one of them$"):
            load(str(run))
    state = tmp_path / "search_state.pt"
    torch.save({"agent": {}, "episode": 3, "args": {}}, str(state))
    with pytest.raises(ValueError, match="search.py's search state, not a model checkpoint"):
        load_checkpoint(str(state))


@pytest.mark.parametrize("edit", ["renamed", "no clusters"])
def test_quantized_layers_a_last_pt_records_that_no_longer_fit_are_one_line_naming_it(tmp_path,
                                                                                       edit):
    """A quantized last.pt (a torch file: it carries a resume state) records its quantized
    layers by name, rebuilt before the strict load. A layer the model's code no longer has
    (renamed without a RENAMED_LAYERS entry) was refused as 'quant state: ...', naming no file
    (a packed best.pt's same error names it), and a damaged entry was a KeyError traceback."""
    from lib.quant import list_quantizable, quantize_model, uniform_policy
    model = build_model("pt_cls_tiny", **KWARGS)
    quantize_model(model, uniform_policy(list_quantizable(model), 3))
    path = tmp_path / "last.pt"
    save_checkpoint(str(path), model, meta(), resume_state={"epoch": 1})
    record = torch.load(path, weights_only=True)
    name = next(iter(record["quant"]))
    if edit == "renamed":
        record["quant"]["renamed." + name] = record["quant"].pop(name)
    else:
        del record["quant"][name]["clusters"]
    torch.save(record, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert ("renamed." + name if edit == "renamed" else "clusters") in message
