"""The searched policy as a file (`policy.json`, written by search.py, read by finetune.py) and
the flags that turn a policy file, a uniform width, and the mixed-precision choice into the
{layer name: bits or None} dict that lib/quant applies."""
import json

from lib.checkpoint import atomic_write


def parse_keep(value):
    """--keep-first-last: 'fp32' -> None (stay fp32), a number -> that bit width, '' -> not kept."""
    if value in (None, "", "none"):
        return "off"
    if value == "fp32":
        return None
    try:
        bits = int(value)
    except ValueError:
        raise ValueError(f"--keep-first-last {value!r}: give a bit width (e.g. 8) or fp32") from None
    if not 1 <= bits <= 32:
        raise ValueError(f"--keep-first-last {bits}: bit width must be within 1..32")
    return bits


def read_policy(path, layer_names):
    """{layer: bits} from a policy.json, checked against the model's quantizable layers."""
    try:
        with open(path) as f:
            policy = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such policy file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    bits = policy.get("bits") if isinstance(policy, dict) else None
    if not isinstance(bits, dict):
        raise ValueError(f"{path}: no 'bits' mapping of layer name to bit width")
    unknown = sorted(set(bits) - set(layer_names))
    if unknown:
        raise ValueError(f"{path}: layers not in the model: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    return {name: (None if b is None else int(b)) for name, b in bits.items()}


def write_policy(path, record):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
    atomic_write(path, write)
