"""Procedural indoor rooms written in the raw S3DIS layout, so that the embedded default goes
through the same reader as the real release:
`<out>/Stanford3dDataset_v1.2_Aligned_Version/Area_N/<room>/Annotations/<class>_<k>.txt`
(`x y z r g b` per line, one file per object instance) plus `<room>/<room>.txt` holding every
point of the room, as in the release.

A room is a box (floor, ceiling, four walls) with doors, windows and boards set into the walls,
optional beams and columns, and furniture placed by room type. Surfaces are sampled on a
jittered grid (`points_per_m2`), coordinates get a few millimetres of noise and colours are a per-class base
shade plus per-object and per-point noise. Some classes share shades on purpose (beam/ceiling,
column/wall, table/door), so colour alone does not segment a room. Room (area, i) depends only
on (seed, area, i): writing fewer areas leaves the other rooms unchanged.
"""
import os

import numpy as np

from lib.data.s3dis import CLASS_NAMES, RAW_DIRNAME

BASE_COLOUR = {  # mean RGB per class; clutter gets a random colour per object
    "ceiling": (205, 205, 200), "floor": (125, 115, 100), "wall": (190, 180, 160),
    "beam": (198, 198, 192), "column": (185, 176, 156), "window": (150, 175, 205),
    "door": (150, 110, 70), "table": (160, 120, 80), "chair": (70, 70, 82),
    "sofa": (115, 55, 50), "bookcase": (120, 92, 62), "board": (232, 232, 228),
}

# (x-size range, y-size range, then (min, max) counts of tables, chairs, sofas, bookcases, boards,
# clutter, doors, windows). Every room has beams and a column; any three of the four types
# together hold all 13 classes, so each area of >= 3 rooms does (its first rooms differ in type).
ROOM_TYPES = {
    "office": ((3.5, 6.0), (3.0, 5.0), (1, 2), (2, 4), (1, 1), (1, 2), (1, 1), (3, 8), (1, 1), (1, 2)),
    "conferenceRoom": ((5.0, 8.0), (4.0, 6.0), (1, 1), (4, 8), (1, 1), (0, 1), (1, 1), (2, 5), (1, 2), (1, 2)),
    "hallway": ((6.0, 10.0), (1.8, 2.6), (0, 0), (0, 1), (0, 1), (0, 1), (0, 1), (1, 4), (2, 4), (0, 0)),
    "storage": ((2.5, 4.0), (2.5, 4.0), (0, 1), (0, 1), (0, 0), (2, 4), (0, 0), (6, 12), (1, 1), (0, 0)),
}

OPENINGS = {  # class: (width range, (bottom, top) range of z, offset along the inward normal)
    "door": ((0.8, 1.0), ((0.0, 0.0), (2.0, 2.2)), -0.05),  # set back into the wall thickness
    "window": ((0.9, 2.0), ((0.8, 1.0), (1.9, 2.3)), -0.08),
    "board": ((1.5, 3.0), ((0.9, 1.0), (1.9, 2.1)), 0.02),  # hangs in front of the wall
}


def sample_rect(rng, origin, u, v, density):
    """Points on the parallelogram origin + s u + t v, s, t in [0, 1]: (n, 3), one random
    point per cell of a (density)^-1/2 spaced grid. Stratified like a scanner's pattern rather
    than Poisson, so no 4 cm cell holds many times the mean (that would multiply the test crops
    needed to cover every point)."""
    origin, u, v = (np.asarray(a, dtype=np.float64) for a in (origin, u, v))
    nu, nv = (max(1, int(round(np.linalg.norm(e) * np.sqrt(density)))) for e in (u, v))
    s = (np.arange(nu)[:, None] + rng.random((nu, nv))).reshape(-1, 1) / nu
    t = (np.arange(nv)[None, :] + rng.random((nu, nv))).reshape(-1, 1) / nv
    return origin + s * u + t * v


def sample_box(rng, centre, size, density, yaw=0.0):
    """Points on the six faces of a box of `size` (dx, dy, dz) whose bottom face is centred at
    `centre`, turned by `yaw` about the vertical axis: (n, 3)."""
    half = np.asarray(size, dtype=np.float64) / 2
    faces = []
    for axis in range(3):
        u, v = np.diag(2 * half)[[i for i in range(3) if i != axis]]  # the face's two edges
        for sign in (-1, 1):
            origin = -half.copy()
            origin[axis] = sign * half[axis]
            faces.append(sample_rect(rng, origin, u, v, density))
    pts = np.concatenate(faces) + (0, 0, half[2])
    c, s = np.cos(yaw), np.sin(yaw)
    return pts @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) + centre


def place(rng, centre, yaw, parts, density):
    """An object made of boxes given in its own frame as (offset (x, y, z_bottom), size)."""
    c, s = np.cos(yaw), np.sin(yaw)
    pts = []
    for (ox, oy, oz), size in parts:
        offset = np.array([c * ox - s * oy, s * ox + c * oy, oz])
        pts.append(sample_box(rng, np.asarray(centre) + offset, size, density, yaw))
    return np.concatenate(pts)


def table_parts(w, d):
    legs = [((sx * (w / 2 - 0.06), sy * (d / 2 - 0.06), 0), (0.05, 0.05, 0.71))
            for sx in (-1, 1) for sy in (-1, 1)]
    return [((0, 0, 0.71), (w, d, 0.04))] + legs


def chair_parts():
    legs = [((sx * 0.19, sy * 0.19, 0), (0.04, 0.04, 0.43)) for sx in (-1, 1) for sy in (-1, 1)]
    return [((0, 0, 0.43), (0.46, 0.46, 0.05)), ((0, 0.21, 0.48), (0.46, 0.05, 0.45))] + legs


def sofa_parts(w):
    return [((0, 0, 0), (w, 0.85, 0.42)), ((0, 0.33, 0.42), (w, 0.2, 0.4)),
            ((-w / 2 + 0.1, 0, 0.42), (0.2, 0.85, 0.2)), ((w / 2 - 0.1, 0, 0.42), (0.2, 0.85, 0.2))]


def bookcase_parts(w, h):
    shelves = [((0, 0, z), (w - 0.04, 0.32, 0.02)) for z in np.arange(0.4, h - 0.2, 0.4)]
    return [((0, 0, 0), (w, 0.35, h))] + shelves


def against_wall(rng, lx, ly, depth):
    """A position `depth / 2` in front of a random wall, and the yaw that turns an object's +y
    (its back) towards that wall."""
    wall = rng.integers(4)
    t = rng.uniform(0.8, 0.2 + (lx if wall < 2 else ly) - 1.0)
    return [((t, ly - depth / 2), 0.0), ((t, depth / 2), np.pi),
            ((lx - depth / 2, t), -np.pi / 2), ((depth / 2, t), np.pi / 2)][wall]


def walls_with_openings(rng, lx, ly, h, density, counts):
    """Wall points, minus rectangles given to doors, windows and boards (each moved along the
    wall normal by its offset). Returns a list of (class, points)."""
    walls = [((0, 0, 0), (lx, 0, 0), (0, 1, 0)), ((lx, ly, 0), (-lx, 0, 0), (0, -1, 0)),
             ((0, ly, 0), (0, -ly, 0), (1, 0, 0)), ((lx, 0, 0), (0, ly, 0), (-1, 0, 0))]
    openings = [[] for _ in walls]  # per wall: (class, s0, s1, z0, z1)
    for cls in ("door", "window", "board"):
        (wmin, wmax), ((b0, b1), (t0, t1)), _ = OPENINGS[cls]
        for _ in range(counts[cls]):
            for _attempt in range(20):  # rejection sampling: openings on a wall do not overlap
                k = rng.integers(len(walls))
                length = np.linalg.norm(walls[k][1])
                width = rng.uniform(wmin, wmax)
                if width > length - 0.4:
                    continue
                s0 = rng.uniform(0.2, length - width - 0.2)
                if all(s0 > o[2] + 0.2 or s0 + width < o[1] - 0.2 for o in openings[k]):
                    openings[k].append((cls, s0, s0 + width, rng.uniform(b0, b1), rng.uniform(t0, t1)))
                    break
    items = []
    for (origin, along, normal), wall_openings in zip(walls, openings):
        length = np.linalg.norm(along)
        pts = sample_rect(rng, origin, along, (0, 0, h), density)
        s = (pts - origin) @ np.asarray(along) / length  # position along the wall
        on_wall = np.ones(len(pts), dtype=bool)
        for cls, s0, s1, z0, z1 in wall_openings:
            inside = (s >= s0) & (s <= s1) & (pts[:, 2] >= z0) & (pts[:, 2] <= z1)
            items.append((cls, pts[inside] + OPENINGS[cls][2] * np.asarray(normal)))
            on_wall &= ~inside
        items.append(("wall", pts[on_wall]))
    return items


def make_room(rng, room_type, density):
    """A list of (class, points (n, 3)) in room coordinates, one entry per object instance."""
    (xr, yr, tables, chairs, sofas, bookcases, boards, clutter, doors, windows) = ROOM_TYPES[room_type]

    def count(bounds):
        return int(rng.integers(bounds[0], bounds[1] + 1))

    lx, ly, h = rng.uniform(*xr), rng.uniform(*yr), rng.uniform(2.7, 3.3)
    items = [("floor", sample_rect(rng, (0, 0, 0), (lx, 0, 0), (0, ly, 0), density)),
             ("ceiling", sample_rect(rng, (0, 0, h), (lx, 0, 0), (0, ly, 0), density))]
    items += walls_with_openings(rng, lx, ly, h, density,
                                 {"door": count(doors), "window": count(windows), "board": count(boards)})
    along_x = lx < ly  # beams run across the ceiling along the shorter side
    for _ in range(count((1, 2))):
        t = rng.uniform(0.5, (ly if along_x else lx) - 0.5)
        centre, size = ((lx / 2, t), (lx, 0.3, 0.35)) if along_x else ((t, ly / 2), (0.3, ly, 0.35))
        items.append(("beam", sample_box(rng, (*centre, h - 0.35), size, density)))
    side = rng.uniform(0.35, 0.6)
    (x, y), _ = against_wall(rng, lx, ly, side)
    items.append(("column", sample_box(rng, (x, y, 0), (side, side, h), density)))
    table_spots = []
    for _ in range(count(tables)):
        w, d = (rng.uniform(2.4, 3.5), rng.uniform(1.0, 1.4)) if room_type == "conferenceRoom" \
            else (rng.uniform(1.2, 1.8), rng.uniform(0.6, 0.9))
        x = rng.uniform(w / 2 + 0.7, max(w / 2 + 0.8, lx - w / 2 - 0.7))  # 0.7 m free around it
        y = rng.uniform(d / 2 + 0.7, max(d / 2 + 0.8, ly - d / 2 - 0.7))
        table_spots.append((x, y, w, d))
        items.append(("table", place(rng, (x, y, 0), 0.0, table_parts(w, d), density)))
    for _ in range(count(chairs)):
        if table_spots:  # at a table edge, facing it, with some slack
            x, y, w, d = table_spots[rng.integers(len(table_spots))]
            side = rng.choice([-1, 1])
            pos = (x + rng.uniform(-w / 2, w / 2) * 0.8, y + side * (d / 2 + 0.35))
            yaw = (0.0 if side > 0 else np.pi) + rng.normal(0, 0.3)
        else:
            pos, yaw = (rng.uniform(0.5, lx - 0.5), rng.uniform(0.5, ly - 0.5)), rng.uniform(0, 2 * np.pi)
        items.append(("chair", place(rng, (*pos, 0), yaw, chair_parts(), density)))
    for _ in range(count(sofas)):
        w = rng.uniform(1.4, 2.0)
        pos, yaw = against_wall(rng, lx, ly, 0.85)
        items.append(("sofa", place(rng, (*pos, 0), yaw, sofa_parts(w), density)))
    for _ in range(count(bookcases)):
        w, bh = rng.uniform(0.8, 1.5), rng.uniform(1.6, 2.2)
        pos, yaw = against_wall(rng, lx, ly, 0.35)
        items.append(("bookcase", place(rng, (*pos, 0), yaw, bookcase_parts(w, bh), density)))
    for _ in range(count(clutter)):  # small boxes on the floor or on a table
        size = rng.uniform(0.1, 0.45, 3)
        if table_spots and rng.random() < 0.5:
            x, y, w, d = table_spots[rng.integers(len(table_spots))]
            centre = (x + rng.uniform(-w, w) / 3, y + rng.uniform(-d, d) / 3, 0.75)
        else:
            centre = (rng.uniform(0.3, lx - 0.3), rng.uniform(0.3, ly - 0.3), 0.0)
        items.append(("clutter", sample_box(rng, centre, size, density, rng.uniform(0, np.pi))))
    return [(cls, pts) for cls, pts in items if len(pts)]


def colour(rng, cls, n):
    base = rng.uniform(30, 230, 3) if cls == "clutter" else np.asarray(BASE_COLOUR[cls], dtype=np.float64)
    rgb = base + rng.normal(0, 12, 3) + rng.normal(0, 10, (n, 3))  # per object, per point
    return np.clip(np.round(rgb), 0, 255).astype(np.int64)


def format_lines(xyz, rgb):
    """The release's text format: `x y z r g b`, three decimals, integer colours."""
    rows = zip(*xyz.T.tolist(), *rgb.T.tolist())
    return "".join("%.3f %.3f %.3f %d %d %d\n" % row for row in rows)


def write_room(room_dir, rng, room_type, density):
    """Writes one room's Annotations/<class>_<k>.txt files and <room>.txt; returns its points."""
    ann_dir = os.path.join(room_dir, "Annotations")
    os.makedirs(ann_dir, exist_ok=True)
    offset = np.array([rng.uniform(-30, 30), rng.uniform(-30, 30), rng.uniform(-1, 3)])
    instance = {cls: 0 for cls in CLASS_NAMES}
    texts = []
    for cls, pts in make_room(rng, room_type, density):
        instance[cls] += 1
        xyz = pts + offset + rng.normal(0, 0.004, pts.shape)
        text = format_lines(xyz, colour(rng, cls, len(pts)))
        with open(os.path.join(ann_dir, f"{cls}_{instance[cls]}.txt"), "w") as f:
            f.write(text)
        texts.append(text)
    with open(os.path.join(room_dir, os.path.basename(room_dir) + ".txt"), "w") as f:
        f.write("".join(texts))
    return sum(text.count("\n") for text in texts)


def write_rooms(out_dir, seed=0, areas=(1, 2, 3, 4, 5, 6), rooms_per_area=3, points_per_m2=300.0):
    """Writes `rooms_per_area` procedural rooms into each area under
    out_dir/Stanford3dDataset_v1.2_Aligned_Version; returns the total number of points.
    At the default density a room has roughly 20k-60k points."""
    types = sorted(ROOM_TYPES)
    total = 0
    for area in areas:
        seen = {t: 0 for t in types}
        for i in range(rooms_per_area):
            rng = np.random.default_rng([seed, area, i])
            room_type = types[(i + area) % len(types)] if i < len(types) else types[rng.integers(len(types))]
            seen[room_type] += 1
            room_dir = os.path.join(out_dir, RAW_DIRNAME, f"Area_{area}", f"{room_type}_{seen[room_type]}")
            total += write_room(room_dir, rng, room_type, points_per_m2)
    return total
