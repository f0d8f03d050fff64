"""Packed export of a (partly) quantized model: one file whose payload is exactly the honest
size (size.py), so the reported compression is what a user downloads.

Layout (integers little-endian):
    8 bytes   MAGIC
    4 bytes   format version (uint32)
    8 bytes   header length H (uint64)
    H bytes   header, UTF-8 JSON: {"meta": caller's dict, "byteorder": "little",
              "quant": {layer: {"bits", "method", "clusters"}},
              "tensors": [{"key", "dtype", "shape", "encoding", "bits", "offset", "nbytes"}]}
    payload   the state_dict entries in header order, back to back, offsets from payload start:
              encoding "bits": a quantized layer's indices, exactly `bits` bits each, MSB first,
              the stream zero-padded to a whole byte; "float32": a codebook; "raw": any other
              entry's bytes in its own dtype.
    32 bytes  SHA-256 of everything before it, checked on every read: a flipped bit anywhere
              would otherwise load as a slightly different model. (Version 1 files, written
              before the checksum, have no such trailer.)
"""
import hashlib
import json
import os
import struct
import sys

import numpy as np
import torch

from lib.checkpoint import atomic_write, unwrap
from lib.quant.layers import prepare_quantized, quant_state, quantized_keys

# PNG-style: the high byte and CR LF expose copies through 7-bit or newline-translating channels.
MAGIC = b"\x89QPACK\r\n"
VERSION = 2
DIGEST = 32  # SHA-256 trailer
PREFIX = struct.Struct("<8sIQ")  # magic, version, header length


def pack_bits(values, bits):
    """uint8 array of ceil(n * bits / 8) bytes holding each value in exactly `bits` bits."""
    values = np.asarray(values).astype(_unsigned(bits)).reshape(-1)
    shifts = np.arange(bits - 1, -1, -1, dtype=values.dtype)  # MSB first
    planes = ((values[:, None] >> shifts) & 1).astype(np.uint8)  # (n, bits)
    return np.packbits(planes.reshape(-1))


def unpack_bits(buffer, n, bits):
    """Inverse of pack_bits: (n,) unsigned integers."""
    planes = np.unpackbits(np.frombuffer(buffer, dtype=np.uint8), count=n * bits).reshape(n, bits)
    values = np.zeros(n, dtype=_unsigned(bits))
    for plane in planes.T:
        values = (values << 1) | plane
    return values


def _unsigned(bits):
    return np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _encode(model):
    """[(entry without offset, bytes)] for every state_dict entry, in state_dict order."""
    index_bits, codebooks = quantized_keys(model)
    encoded = []
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        entry = {"key": key, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        if key in index_bits:
            entry.update(encoding="bits", bits=index_bits[key])
            blob = pack_bits(tensor.numpy(), index_bits[key]).tobytes()
        elif key in codebooks:
            entry.update(encoding="float32")
            blob = tensor.float().numpy().tobytes()
        else:
            entry.update(encoding="raw")
            blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        encoded.append((entry, blob))
    return encoded


def save_packed(path, model, meta):
    """Write `model` (unwrapped from DDP / compile) with `meta` (JSON-serialisable) to `path`
    atomically. Returns the number of bytes besides the payload (prefix, header, checksum): the
    file holds exactly that many plus honest_size_bytes(model)."""
    model = unwrap(model)
    encoded = _encode(model)
    offset = 0
    for entry, blob in encoded:
        entry.update(offset=offset, nbytes=len(blob))
        offset += len(blob)
    header = {"meta": meta, "byteorder": sys.byteorder, "quant": quant_state(model),
              "tensors": [entry for entry, _ in encoded]}
    try:
        header_bytes = json.dumps(header, default=_plain).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: meta is not JSON-serialisable ({e})") from None

    def write(tmp):
        digest = hashlib.sha256()
        with open(tmp, "wb") as f:
            for part in [PREFIX.pack(MAGIC, VERSION, len(header_bytes)), header_bytes,
                         *(blob for _, blob in encoded)]:
                f.write(part)
                digest.update(part)
            f.write(digest.digest())

    atomic_write(path, write)
    return PREFIX.size + len(header_bytes) + DIGEST


def _plain(value):
    """numpy / torch scalars and arrays in meta (metrics often are) as plain JSON values."""
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def is_packed(path):
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_header(path):
    """(header dict, payload bytes) of a packed file, checked; one-line ValueError otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such packed model file")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < PREFIX.size or data[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a packed model file (bad magic bytes)")
    _, version, header_len = PREFIX.unpack_from(data)
    if version not in (1, VERSION):
        raise ValueError(f"{path}: packed format version {version}, this code reads {VERSION}")
    digest_size = DIGEST if version >= 2 else 0
    if PREFIX.size + header_len > len(data):
        raise ValueError(f"{path}: truncated inside the header ({len(data)} bytes)")
    try:
        header = json.loads(data[PREFIX.size:PREFIX.size + header_len].decode("utf-8"))
        missing = {"meta", "byteorder", "quant", "tensors"} - set(header)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
        expected = sum(entry["nbytes"] for entry in header["tensors"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: corrupt header ({type(e).__name__}: {e})") from None
    payload = data[PREFIX.size + header_len:len(data) - digest_size]
    if len(payload) != expected:
        problem = "truncated" if len(payload) < expected else "has trailing bytes"
        raise ValueError(f"{path}: {problem}: payload is {len(payload)} bytes, the header "
                         f"promises {expected}")
    if header["byteorder"] != sys.byteorder:
        raise ValueError(f"{path}: written on a {header['byteorder']}-endian machine")
    if digest_size and hashlib.sha256(data[:-digest_size]).digest() != data[-digest_size:]:
        raise ValueError(f"{path}: checksum mismatch: the file was changed or damaged after "
                         f"it was written")
    return header, payload


def _decode(entry, payload):
    blob = payload[entry["offset"]:entry["offset"] + entry["nbytes"]]
    dtype = getattr(torch, entry["dtype"])
    shape = entry["shape"]
    if entry["encoding"] == "bits":
        values = unpack_bits(blob, int(np.prod(shape, dtype=np.int64)), entry["bits"])
        return torch.from_numpy(values.astype(np.int64)).to(dtype).reshape(shape)
    if entry["encoding"] == "float32":
        dtype = torch.float32
    if not blob:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype).reshape(shape)


def load_packed(path, build_model_fn):
    """(meta, model): build_model_fn(meta) gives the fp32 architecture; its quantized layers are
    restored (same bits, codebooks, indices) and every entry is loaded strictly."""
    header, payload = read_header(path)
    model = build_model_fn(header["meta"])
    try:
        prepare_quantized(model, header["quant"])
        state = {entry["key"]: _decode(entry, payload) for entry in header["tensors"]}
        unwrap(model).load_state_dict(state, strict=True)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"{path}: stored weights do not fit the model built from its meta "
                         f"({reason or type(e).__name__})") from None
    return header["meta"], model
