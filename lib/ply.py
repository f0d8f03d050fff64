"""Point clouds as binary little-endian PLY files with per-point integer fields (label, pred):
the format CloudCompare, MeshLab and Open3D open, written with numpy alone.

The header lists one `element vertex N` with x y z (float), red green blue (uchar) and any
integer fields; CloudCompare shows the integer fields as scalar fields, and every viewer shows
the colours. `comment` lines carry the class names, so a file explains its own label ids.
"""
import numpy as np

from lib.checkpoint import atomic_write

# PLY type names of the numpy dtypes written here (PLY 1.0 spelling, which every reader knows).
PLY_TYPES = {np.dtype("<f4"): "float", np.dtype("u1"): "uchar", np.dtype("<u2"): "ushort",
             np.dtype("<i4"): "int"}
NUMPY_TYPES = {name: dtype for dtype, name in PLY_TYPES.items()}


def label_dtype(num_classes):
    """The smallest PLY integer type holding ids 0..num_classes-1 (a room has millions of
    points, so the type matters)."""
    if num_classes <= 256:
        return np.dtype("u1")
    return np.dtype("<u2") if num_classes <= 65536 else np.dtype("<i4")


def write_ply(path, xyz, rgb=None, fields=None, comments=()):
    """xyz (N, 3) float, rgb (N, 3) uint8 or None, fields {name: (N,) integer array, written in
    its own dtype (one of PLY_TYPES)}, comments: lines without newlines. Written atomically."""
    xyz = np.asarray(xyz, dtype="<f4").reshape(-1, 3)
    columns = [("x", xyz[:, 0]), ("y", xyz[:, 1]), ("z", xyz[:, 2])]
    if rgb is not None:
        rgb = np.asarray(rgb, dtype="u1").reshape(-1, 3)
        columns += [("red", rgb[:, 0]), ("green", rgb[:, 1]), ("blue", rgb[:, 2])]
    for name, values in (fields or {}).items():
        values = np.asarray(values)
        if values.dtype.newbyteorder("<") not in PLY_TYPES or len(values) != len(xyz):
            raise ValueError(f"{path}: field {name!r} must hold {len(xyz)} values of one of "
                             f"{sorted(PLY_TYPES.values())}, got {values.dtype} x {len(values)}")
        columns.append((name, values.astype(values.dtype.newbyteorder("<"))))
    record = np.dtype([(name, values.dtype) for name, values in columns])
    table = np.empty(len(xyz), dtype=record)
    for name, values in columns:
        table[name] = values
    header = ["ply", "format binary_little_endian 1.0"]
    header += [f"comment {line}" for line in comments]
    header += [f"element vertex {len(xyz)}"]
    header += [f"property {PLY_TYPES[values.dtype]} {name}" for name, values in columns]
    header += ["end_header"]

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(table.tobytes())

    atomic_write(path, write)


def read_ply(path):
    """-> ({property name: (N,) array}, [comment lines]) of a file written by write_ply (binary
    little-endian, one vertex element with scalar properties)."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    lines = data[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise ValueError(f"{path}: only binary little-endian PLY is read here")
    comments = [line[len("comment "):] for line in lines if line.startswith("comment ")]
    count, columns = None, []
    for line in lines:
        words = line.split()
        if words[:2] == ["element", "vertex"]:
            count = int(words[2])
        elif words[:1] == ["property"]:
            if words[1] not in NUMPY_TYPES:
                raise ValueError(f"{path}: unsupported property line {line!r}")
            columns.append((words[2], NUMPY_TYPES[words[1]]))
    table = np.frombuffer(data, dtype=np.dtype(columns), count=count,
                          offset=end + len(b"end_header\n"))
    return {name: table[name].copy() for name, _ in columns}, comments
