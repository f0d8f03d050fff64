"""The other released forms of each dataset, written from synthetic data, so that tests cover
every reader without real data (the forms are described in the readers' docstrings):

    parts_as(src, out, "v0" | "hdf5")   ShapeNet part v0 / hdf5 from a v0_normal folder
    write_cls_off(out, seed)             ModelNet's OFF meshes (procedural boxes and prisms)
    rooms_as(src, out, "npy" | "pointcept")   S3DIS per-room N x 7 .npy / Pointcept folders
                                              from a raw-release folder

A converted form holds the same shapes (rooms) as its source, in the source's order, so that
a test can read both and compare points, labels and metrics.
"""
import shutil
from pathlib import Path

import numpy as np

from lib.data import read_point_table
from lib.data.shapenet_part import (CATEGORY_FILE, PART_RANGES_FILE, read_categories,
                                   read_part_ranges, read_split)
from lib.data.shapenet_part_h5 import CATEGORY_FILE as H5_CATEGORY_FILE

SPLIT_NAMES = ("train", "val", "test")


# ---------------------------------------------------------------- ShapeNet part

def listed_shapes(src, split):
    """-> [(category, synset, shape id, table (n, 7))] of a v0_normal folder's split, in list
    order, the shapes whose file is present."""
    names, synsets = read_categories(src / CATEGORY_FILE)
    entries = read_split(src / "train_test_split" / f"shuffled_{split}_file_list.json", synsets)
    return [(c, synset, shape_id, read_point_table(src / synset / f"{shape_id}.txt", 7))
            for c, synset, shape_id in entries if (src / synset / f"{shape_id}.txt").is_file()]


def parts_as(src, out, layout, points=2048):
    """Writes the v0_normal folder `src` as `layout` into `out`, each shape cut to its first
    `points` rows (the hdf5 form needs one size; v0 takes the same rows, so both hold the very
    same points)."""
    src, out = Path(src), Path(out)
    names, _ = read_categories(src / CATEGORY_FILE)
    part_ranges, _ = read_part_ranges(src, names)
    out.mkdir(parents=True, exist_ok=True)
    if (src / PART_RANGES_FILE).is_file():  # synthetic data names its parts
        shutil.copy(src / PART_RANGES_FILE, out / PART_RANGES_FILE)
    if layout == "v0":
        shutil.copy(src / CATEGORY_FILE, out / CATEGORY_FILE)
        shutil.copytree(src / "train_test_split", out / "train_test_split")
    else:
        shutil.copy(src / CATEGORY_FILE, out / H5_CATEGORY_FILE)  # the same `Name<TAB>synset`
    for split in SPLIT_NAMES:
        shapes = listed_shapes(src, split)
        if layout == "v0":
            write_v0_shapes(out, shapes, part_ranges, points)
        else:
            write_h5_split(out, split, shapes, points)


def write_v0_shapes(out, shapes, part_ranges, points):
    for category, synset, shape_id, table in shapes:
        (out / synset / "points").mkdir(parents=True, exist_ok=True)
        (out / synset / "points_label").mkdir(exist_ok=True)
        table = table[:points]
        np.savetxt(out / synset / "points" / f"{shape_id}.pts", table[:, :3], fmt="%.6f")
        first_part = part_ranges[category][0]
        np.savetxt(out / synset / "points_label" / f"{shape_id}.seg",
                   table[:, 6] - first_part + 1, fmt="%d")  # v0 numbers parts 1..k


def write_h5_split(out, split, shapes, points):
    import h5py
    short = [shape_id for _, _, shape_id, table in shapes if len(table) < points]
    if short:
        raise ValueError(f"shapes {short[:3]} have fewer than {points} points")
    name = f"ply_data_{split}0.h5"
    (out / f"{split}_hdf5_file_list.txt").write_text(f"{name}\n")
    if not shapes:  # listed but absent, as in a partial download
        return
    with h5py.File(out / name, "w") as f:
        f.create_dataset("data", data=np.stack([t[:points, :3] for *_, t in shapes]))
        f.create_dataset("label", data=np.array([[c] for c, *_ in shapes], dtype=np.uint8))
        f.create_dataset("pid", data=np.stack([t[:points, 6] for *_, t in shapes]).astype(np.uint8))


# ---------------------------------------------------------------- ModelNet meshes

def box(centre, size):
    """8 corners and 6 outward quads of an axis-aligned box."""
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
    vertices = np.asarray(centre) + signs * np.asarray(size) / 2  # corner 4x + 2y + z
    return vertices, [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4),
                      (1, 5, 7, 3)]


def prism(base, r_bottom, r_top, height, sides=12):
    """A (truncated) cone or cylinder along +z from `base`: quads round the side and two
    `sides`-gon caps (polygons, which the OFF reader fans into triangles)."""
    angles = np.linspace(0, 2 * np.pi, sides, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles), np.zeros(sides)], 1)
    vertices = np.concatenate([base + r_bottom * ring, base + r_top * ring + [0, 0, height]])
    sides_quads = [(i, (i + 1) % sides, sides + (i + 1) % sides, sides + i) for i in range(sides)]
    caps = [tuple(range(sides - 1, -1, -1)), tuple(range(sides, 2 * sides))]
    return vertices, sides_quads + caps


def legs(width, depth, height, thickness):
    return [box((sx * (width / 2 - thickness), sy * (depth / 2 - thickness), height / 2),
                (thickness, thickness, height)) for sx in (-1, 1) for sy in (-1, 1)]


def table_parts(rng):
    w, d, h = rng.uniform(1.2, 2.0), rng.uniform(0.6, 1.0), rng.uniform(0.6, 0.9)
    return [box((0, 0, h), (w, d, 0.05))] + legs(w, d, h, 0.06)


def chair_parts(rng):
    w, h, back = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.5), rng.uniform(0.4, 0.7)
    return ([box((0, 0, h), (w, w, 0.05)), box((0, w / 2, h + back / 2), (w, 0.05, back))]
            + legs(w, w, h, 0.04))


def lamp_parts(rng):
    pole = rng.uniform(0.8, 1.4)
    return [prism(np.zeros(3), rng.uniform(0.15, 0.25), 0.2, 0.04),
            prism(np.array([0, 0, 0.04]), 0.02, 0.02, pole, sides=6),
            prism(np.array([0, 0, pole]), rng.uniform(0.2, 0.3), 0.1, 0.25)]


def bottle_parts(rng):
    r, h = rng.uniform(0.08, 0.12), rng.uniform(0.25, 0.4)
    return [prism(np.zeros(3), r, r, h), prism(np.array([0, 0, h]), r, 0.03, 0.1),
            prism(np.array([0, 0, h + 0.1]), 0.03, 0.03, 0.08)]


MESH_CLASSES = {"bottle": bottle_parts, "chair": chair_parts, "lamp": lamp_parts,
                "table": table_parts}


def off_text(parts, joined_header):
    """OFF text of the parts as one mesh; joined_header writes `OFF<V> <F> 0` on one line, as
    some ModelNet files do."""
    vertices, faces, offset = [], [], 0
    for part_vertices, part_faces in parts:
        vertices.append(part_vertices)
        faces += [tuple(i + offset for i in face) for face in part_faces]
        offset += len(part_vertices)
    vertices = np.concatenate(vertices)
    header = f"OFF{len(vertices)} {len(faces)} 0\n" if joined_header else \
        f"OFF\n{len(vertices)} {len(faces)} 0\n"
    return (header + "".join("%.6f %.6f %.6f\n" % tuple(v) for v in vertices)
            + "".join(f"{len(face)} {' '.join(map(str, face))}\n" for face in faces))


def write_cls_off(out, seed=0, train_shapes=8, eval_shapes=2):
    """<class>/{train,test}/<class>_NNNN.off for the MESH_CLASSES, random proportions."""
    out = Path(out)
    for c, (name, make) in enumerate(MESH_CLASSES.items()):
        for k in range(train_shapes + eval_shapes):
            split = "train" if k < train_shapes else "test"
            folder = out / name / split
            folder.mkdir(parents=True, exist_ok=True)
            parts = make(np.random.default_rng([seed, 3, c, k]))
            (folder / f"{name}_{k + 1:04d}.off").write_text(off_text(parts, k % 3 == 2))


# ---------------------------------------------------------------- S3DIS rooms

def rooms_as(src, out, layout):
    """Writes every room of the raw-release folder `src` as `layout` into `out`: "npy" as
    Area_N_<room>.npy (float64 x y z r g b label, xyz shifted to the room's minimum, as
    PointNet's collect_indoor3d_data.py writes them), "pointcept" as
    Area_N/<room>/{coord,color,segment}.npy with Pointcept's dtypes."""
    from lib.data.s3dis import AREAS, find_raw_dir, list_rooms, read_room
    raw_dir, out = find_raw_dir(str(src)), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in list_rooms(raw_dir, AREAS):
        xyz, rgb, label = read_room(str(Path(raw_dir) / name))
        if layout == "npy":
            shifted = xyz.astype(np.float64) - xyz.min(0)
            table = np.column_stack([shifted, rgb, label]).astype(np.float64)
            np.save(out / f"{name.replace('/', '_')}.npy", table)
        else:
            room = out / name
            room.mkdir(parents=True)
            np.save(room / "coord.npy", xyz.astype(np.float32))
            np.save(room / "color.npy", rgb.astype(np.uint8))
            np.save(room / "segment.npy", label.astype(np.int16).reshape(-1, 1))
