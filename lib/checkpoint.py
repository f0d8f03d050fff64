"""Self-describing checkpoints: written atomically, loaded with weights_only=True.

A checkpoint (lib/DESIGN.md "Checkpoints") is one file, written in one atomic step, so a crash
leaves either the old or the new one. A checkpoint that carries a resume state (last.pt: optimizer, scheduler, RNG) is one
torch file holding everything; for a quantized model it also records the quantized layers
(`quant`), so they are rebuilt before the strict load. A quantized model without a resume state
(best.pt) is stored packed (lib/quant/pack.py: bit-packed indices + codebooks + fp32 rest) with
the same metadata in its header, so its file has exactly the honest size.
"""
import errno
import hashlib
import json
import os
import pickle
import random
import subprocess
import tempfile
import zipfile

import numpy as np
import torch

FORMAT_VERSION = 1
TEMP_PREFIX = ".tmp-"  # atomic_write's temporaries; a run folder's claim removes stale ones


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path), then rename over `path`: a crash never leaves half a file. A
    write that fails (a full disk, a read-only folder) is an OSError naming `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
        os.close(fd)
        write_fn(tmp)
        # mkstemp creates the file private (0600); a checkpoint gets the permissions of any
        # file the user creates, so a lab's group can read it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        reason = _write_failure(e)
        if reason is None:
            raise
        kept = "; the file there before is kept" if os.path.exists(path) else ""
        raise OSError(getattr(e, "errno", None) or errno.EIO, f"not written ({reason}){kept}",
                      path) from e


def _write_failure(error):
    """Why a file could not be written, in words, or None for an error that is no write failure.
    torch.save reports a short write (a full disk) as a RuntimeError of its zip writer that
    names no file; an OSError names the temporary file, not the one being written. (The
    write_fn of this module's callers opens no other file, so an OSError is the write's.)"""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if isinstance(error, RuntimeError) and ("inline_container" in str(error)
                                            or "PytorchStreamWriter" in str(error)):
        return "torch.save could not write it whole; is the disk full?"
    return None


def atomic_write_json(path, obj, default=None):
    """`obj` as indented JSON at `path`, written atomically: the run scripts take a stage's last
    file (best_test.json, baselines.json) as the sign that its run ended. default: json's, for
    values it cannot write (args.json's flags: str)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2, default=default) + "\n")
    atomic_write(path, write)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def torch_save_atomic(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def require_file(path):
    """A one-line error unless `path` is a file: missing, or a folder (a run folder given for
    the checkpoint in it), which was called missing too."""
    if os.path.isdir(path):
        held = [name for name in ("best.pt", "last.pt")
                if os.path.isfile(os.path.join(path, name))]
        hint = f"; it holds {' and '.join(held)}: give one of them" if held else ""
        raise ValueError(f"{path}: a folder, not a checkpoint file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")


def torch_load(path):
    """torch.load(weights_only=True) with a one-line error for missing, truncated or foreign files."""
    require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip errors, unpickling errors, EOF: all mean "not a checkpoint of ours"
        raise ValueError(f"{path}: not a readable checkpoint ({_unreadable(path, e)})") from None


def _unreadable(path, error):
    """Why torch.load refused a file, in words: torch's own messages name its internals (a zip
    reader's errno, an unpickler's opcode) or advise weights_only=False, which is not for us."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "an empty file"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return "truncated or damaged: not a whole zip archive, as torch.save writes"
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):  # neither torch's zip nor a pickle
        return "not a file torch.save wrote"
    if isinstance(error, pickle.UnpicklingError):
        return ("holds Python objects other than tensors and plain values; only checkpoints "
                "that this code writes load, with weights_only=True")
    # otherwise torch's first line says what failed; its further paragraphs advise torch users
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def file_sha256(path):
    """Hex SHA-256 of a file's bytes: what a resumed run checks its --ckpt against, and part
    of the C library's build record (lib/ops/native.py)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(named_tensors):
    """Hex SHA-256 of (name, tensor) pairs, in the order given: each name, then the tensor's
    bytes (any dtype, any device). Whether a search measures its rewards on the same samples,
    or two models hold the same weights."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def same_input_as_recorded(path, recorded, flag, sha256=None):
    """A one-line ValueError when the file at `path` no longer has the SHA-256 the run recorded
    (None: a run from before the record, not checked). sha256: the file's, where it was read
    already (the SHA-256 of the bytes a model was loaded from); else it is read now."""
    if recorded is not None and (sha256 or file_sha256(path)) != recorded:
        raise ValueError(f"{path}: changed since this run started (its SHA-256 differs from the "
                         f"one recorded); the resumed run would go on from another model than "
                         f"its {flag}. Restore that file, or start a new run")


def unwrap(model):
    """The plain module under DDP / torch.compile wrappers, so state_dict keys carry no prefixes."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            # the generator of the GPU the run uses (its current device), not every visible
            # GPU's: those would not load where fewer are visible
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if state["cuda"] and torch.cuda.is_available():
        # into the GPU this process uses (under torchrun each rank's own); a state of every
        # visible GPU (older checkpoints) starts with GPU 0's. Every rank takes the main rank's
        # state, which changes no draw: lib/train.fit seeds torch's generators at each epoch
        # by (seed, epoch, process).
        torch.cuda.set_rng_state(state["cuda"][0])


def is_quantized(model):
    from lib.quant.layers import is_quantized_layer
    return any(is_quantized_layer(m) for m in unwrap(model).modules())


def save_checkpoint(path, model, meta, resume_state=None):
    """Write model + metadata (+ `resume_state`: optimizer, scheduler, epoch, RNG ...) to `path`:
    packed for a quantized model without a resume state, one torch file otherwise."""
    model = unwrap(model)
    meta = dict(meta, format_version=FORMAT_VERSION)
    if is_quantized(model) and resume_state is None:
        from lib.quant.pack import save_packed
        save_packed(path, model, meta)
        return
    obj = {"meta": meta, "state_dict": model.state_dict()}
    if is_quantized(model):
        from lib.quant.layers import quant_state
        obj["quant"] = quant_state(model)
    if resume_state is not None:
        obj["resume"] = resume_state
    torch_save_atomic(obj, path)


def checkpoint_meta(path):
    """The meta dict a checkpoint records, read without building its model."""
    from lib.quant.pack import is_packed, read_header
    if is_packed(path):
        return read_header(path)[0]["meta"]
    record = torch_load(path)
    if not isinstance(record, dict) or not isinstance(record.get("meta", {}), dict):
        raise ValueError(f"{path}: not a checkpoint of this repository (no meta record)")
    return record.get("meta", {})


def checkpoint_epoch(path):
    """The epoch a checkpoint records, read without building its model."""
    return checkpoint_meta(path).get("epoch")


def load_checkpoint(path):
    """-> (meta, model, resume_state or None). The model is rebuilt from the recorded name and
    constructor arguments; loads are strict; weights that are not finite are refused."""
    from lib.quant.pack import is_packed, load_packed
    from models import build_model

    def build(meta):
        try:
            return build_model(meta["model"]["name"], **meta["model"]["kwargs"])
        except (KeyError, TypeError, ValueError) as e:  # ValueError: a model name unknown here
            raise ValueError(f"{path}: checkpoint metadata does not describe a model "
                             f"({' '.join(str(e).split())})") from None

    require_file(path)
    if is_packed(path):
        meta, model = load_packed(path, build)
        return meta, _finite(model, path), None
    obj = torch_load(path)
    if isinstance(obj, dict) and "agent" in obj:
        raise ValueError(f"{path}: search.py's search state, not a model checkpoint (its model is "
                         f"the search's --ckpt; its policy is policy.json, for finetune.py)")
    if not isinstance(obj, dict) or "meta" not in obj or "state_dict" not in obj:
        raise ValueError(f"{path}: not a checkpoint of this repository (no 'meta'/'state_dict')")
    meta = obj["meta"]
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')} "
                         f"is not the supported {FORMAT_VERSION}")
    model = build(meta)
    _load_state(model, obj["state_dict"], path, obj.get("quant"))
    return meta, _finite(model, path), obj.get("resume")


def _load_state(model, state_dict, path, quant=None):
    """The strict load, after the quantized layers that `quant` records are rebuilt. Either may
    fail on a model whose code changed since the file was written (a layer renamed without a
    RENAMED_LAYERS entry, an entry added or removed): one line naming the file, as a packed
    file's load gives."""
    from lib.quant.layers import prepare_quantized
    try:
        if quant:
            prepare_quantized(model, quant)
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if isinstance(e, KeyError):  # its message is the bare key
            reason = f"no {reason} entry"
        raise ValueError(f"{path}: weights do not match the recorded model ({reason})") from None


def non_finite_entry(model):
    """The name of the first state_dict entry holding NaN or inf (a diverged run), or None."""
    for name, tensor in unwrap(model).state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def _finite(model, path):
    """The model, unless a weight is not finite: scoring it would give a believable but
    meaningless number."""
    name = non_finite_entry(model)
    if name is not None:
        raise ValueError(f"{path}: {name} holds NaN or infinite values; the run that wrote it "
                         f"had diverged")
    return model
