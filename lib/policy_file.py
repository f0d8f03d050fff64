"""The searched policy as a file (`policy.json`, written by search.py, read by finetune.py) and
the flags that turn a policy file, a uniform width, and the mixed-precision choice into the
{layer name: bits or None} dict that lib/quant applies."""
import hashlib
import json

from lib.checkpoint import atomic_write_json
from lib.cli import METHODS, parse_keep
from lib.data import read_text_file
from lib.quant.layers import is_fp32


def recorded_keep(flag):
    """--keep-first-last as policy.json and a fine-tune's record hold it: the flag's text ("8",
    "fp32"), or null when nothing is kept ("", "none")."""
    return keep_text(parse_keep(flag))


def keep_text(keep):
    """parse_keep's value as a record holds it: "8", "fp32", or None when nothing is kept."""
    return None if keep == "off" else "fp32" if keep is None else str(keep)


def policy_digest(record):
    """SHA-256 of a policy's record as canonical JSON, but the path of the checkpoint it was
    searched on: a fine-tune records which policy it applied, so that a policy searched again
    later is not taken for it, while a search extended in a run folder moved since (which
    rewrites that path alone; checkpoint_sha256 stays) is the same policy."""
    kept = {key: value for key, value in record.items() if key != "checkpoint"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


class PolicyFile:
    """A policy.json, read once: `bits`, `keep`, `check_kept` and `check_searched_on` check what
    finetune.py uses of it; `digest` (policy_digest) identifies it. Every problem is a one-line
    error naming the file, never a guess."""

    def __init__(self, path):
        self.path = path
        try:
            text = read_text_file(path)  # a byte that is not UTF-8: an error naming its line
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such policy file") from None
        try:
            self.record = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(self.record, dict) or not isinstance(self.record.get("bits"), dict):
            raise ValueError(f"{path}: no 'bits' mapping of layer name to bit width")
        self.digest = policy_digest(self.record)

    def bits(self, layer_names, renames=None):
        """{layer: bits or None (fp32)}, checked strictly: every layer it lists is a quantizable
        layer of the model (`layer_names`), and each width is an integer in 1..32 (32: fp32) or
        fp32 (null or "fp32"); 3.7, true or "four" are refused. Whether it lists every layer it
        must is check_listed's (it needs the forward's calls). renames: {old layer name: current
        one} (lib.quant's layer_renames), for policies written before a layer was renamed."""
        path = self.path
        bits = {(renames or {}).get(name, name): value
                for name, value in self.record["bits"].items()}
        unknown = sorted(set(bits) - set(layer_names))
        if unknown:
            raise ValueError(f"{path}: layers not in the model: {_some(unknown)}")
        for name, value in bits.items():
            valid = value is None or value == "fp32" or (
                type(value) is int and 1 <= value <= 32)  # bool is an int subclass: not a width
            if not valid:
                raise ValueError(f"{path}: layer {name}: bit width {json.dumps(value)} is not an "
                                 f"integer in 1..32 or fp32")
        return {name: None if value in (None, "fp32") else value for name, value in bits.items()}

    def check_searched_on(self, ckpt, ckpt_sha256):
        """A one-line ValueError when the policy was searched on another model than the file
        `ckpt` of SHA-256 `ckpt_sha256` (search.py records the one it searched; policies
        without it are not checked): its widths were chosen for that model's layers."""
        recorded = self.record.get("checkpoint_sha256")
        if recorded is not None and ckpt_sha256 != recorded:
            raise ValueError(f"{self.path}: searched on another model than {ckpt} (the "
                             f"SHA-256 it records differs; it was searched on "
                             f"{self.record.get('checkpoint')}); search this checkpoint, or "
                             f"fine-tune the one it was searched on")

    def keep(self):
        """The keep_first_last the policy was searched with, as parse_keep gives it: search.py
        writes the flag's text ("8", "fp32") or null (not kept); an integer is taken too."""
        value = self.record.get("keep_first_last")
        if value in (None, "fp32", "none", ""):  # "none": written by search.py before recorded_keep
            return parse_keep(value)
        if type(value) is str and value.isdigit():
            value = int(value)
        if type(value) is not int or not 1 <= value <= 32:  # bool is an int subclass: not a width
            raise ValueError(f"{self.path}: keep_first_last {json.dumps(value)} is not a bit "
                             f"width in 1..32, fp32 or null")
        return value

    def check_listed(self, bits, called):
        """A one-line ValueError when `bits` (this file's widths, as `bits` gives them) leave out
        a layer of `called` (lib.quant.called_layers' names): the layers the forward calls are
        the ones search.py searches. A layer it never calls is not searched, may be left out,
        and stays fp32."""
        missing = [name for name in called if name not in bits]
        if missing:
            raise ValueError(f"{self.path}: {len(missing)} of the {len(called)} layers the "
                             f"model's forward calls have no bit width: {_some(missing)}")

    def check_kept(self, bits, first_last):
        """A one-line ValueError when `bits` (this file's widths, as `bits` gives them) hold the
        first or last layer (`first_last`, lib.quant.first_and_last's names) at another width
        than the keep_first_last the file records. search.py writes them at that width, so such
        a file was edited by hand, and which of the two it means would be a guess: a fine-tune
        applied the bits and recorded the other, or with --keep-first-last replaced the bits."""
        keep = self.keep()
        if keep == "off":
            return
        differ = [f"{name} at {_width(bits[name])}" for name in dict.fromkeys(first_last)
                  if not (bits[name] == keep or (is_fp32(bits[name]) and is_fp32(keep)))]
        if differ:
            raise ValueError(f"{self.path}: keep_first_last {keep_text(keep)} says the first and "
                             f"last layers are kept at {_width(keep)}, but its bits hold "
                             f"{' and '.join(differ)}; make the two agree")

    def method(self):
        """The weight sharing the policy's rewards were measured with (search.py's --method), or
        None for a policy that does not record it."""
        value = self.record.get("method")
        if value is not None and value not in METHODS:
            raise ValueError(f"{self.path}: method {json.dumps(value)} is not one of "
                             f"{', '.join(METHODS)}")
        return value


def read_on_every_rank(path, tries=3):
    """PolicyFile(path), the same policy on every rank: each rank reads the file itself, and a
    search writing its policy.json between two ranks' reads gave them other bits or another
    weight sharing (lib/distributed.same_on_every_rank)."""
    from lib.distributed import same_on_every_rank
    return same_on_every_rank(path, lambda: PolicyFile(path), lambda p: p.digest, "a search",
                              tries)


def _width(bits):
    return "fp32" if is_fp32(bits) else f"{bits} bits"


def _some(names):
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def write_policy(path, record):
    atomic_write_json(path, record)
