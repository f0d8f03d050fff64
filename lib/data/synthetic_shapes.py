"""Procedural shapes for the synthetic datasets (lib/data/synthetic.py writes them to disk).

A shape is a set of parts, a part a set of surfaces (boxes, frustums, ellipsoids, tori) sampled
area-uniformly with outward normals. Proportions, part styles and counts are random, then the
shape gets a random yaw, a small tilt and noise (sample_shape).
"""
from typing import Callable, NamedTuple

import numpy as np

from lib.data.transforms import normalize_unit_sphere

TWO_PI = 2 * np.pi
NOISE = 0.005  # Gaussian, in units of the unit-sphere-normalised shape


# ---------------------------------------------------------------- surfaces (local frames)
class Surface(NamedTuple):
    area: float
    sample: Callable  # (rng, n) -> points (n, 3), outward normals (n, 3)


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(min=1e-12)


def _rejection(rng, n, propose, density, bound):
    """n draws of propose(m) (m candidates), each kept with probability density(x) / bound."""
    kept, count = [], 0
    while count < n:
        x = propose(2 * n)
        x = x[rng.uniform(0, bound, len(x)) < density(x)]
        kept.append(x)
        count += len(x)
    return np.concatenate(kept)[:n]


def box(sx, sy, sz):
    """Six faces of an axis-aligned box centred on the origin."""
    half = np.array([sx, sy, sz]) / 2
    face_areas = np.repeat([sy * sz, sx * sz, sx * sy], 2)  # -x +x -y +y -z +z

    def sample(rng, n):
        face = rng.choice(6, n, p=face_areas / face_areas.sum())
        axis, sign = face // 2, face % 2 * 2 - 1.0
        points = rng.uniform(-half, half, size=(n, 3))
        points[np.arange(n), axis] = sign * half[axis]
        normals = np.zeros((n, 3))
        normals[np.arange(n), axis] = sign
        return points, normals
    return [Surface(face_areas.sum(), sample)]


def disc(radius, y, up):
    def sample(rng, n):
        r, theta = radius * np.sqrt(rng.uniform(size=n)), rng.uniform(0, TWO_PI, n)
        points = np.stack([r * np.cos(theta), np.full(n, y), r * np.sin(theta)], 1)
        return points, np.tile([0.0, 1.0 if up else -1.0, 0.0], (n, 1))
    return Surface(np.pi * radius ** 2, sample)


def frustum(r_bottom, r_top, height, bottom_cap=True, top_cap=True):
    """Truncated cone along +y from y=0 (cylinder: equal radii; cone: r_top=0), optional caps."""
    def sample(rng, n):
        # Area density along the axis is linear in the radius: a mixture of the two triangular
        # densities, weighted by the end radii.
        u = rng.uniform(size=n)
        t = np.where(rng.uniform(size=n) * (r_bottom + r_top) < r_bottom,
                     1 - np.sqrt(u), np.sqrt(u))
        r, theta = r_bottom + (r_top - r_bottom) * t, rng.uniform(0, TWO_PI, n)
        points = np.stack([r * np.cos(theta), t * height, r * np.sin(theta)], 1)
        normals = _unit(np.stack([height * np.cos(theta), np.full(n, r_bottom - r_top),
                                  height * np.sin(theta)], 1))
        return points, normals
    slant = np.hypot(r_bottom - r_top, height)
    surfaces = [Surface(np.pi * (r_bottom + r_top) * slant, sample)]
    if bottom_cap and r_bottom > 0:
        surfaces.append(disc(r_bottom, 0.0, up=False))
    if top_cap and r_top > 0:
        surfaces.append(disc(r_top, height, up=True))
    return surfaces


def ellipsoid(a, b, c):
    """Semi-axes a, b, c along x, y, z. Area-uniform by rejection: the map u -> (a, b, c) * u of
    the unit sphere stretches area by |(bc u1, ac u2, ab u3)|."""
    stretch = np.array([b * c, a * c, a * b])
    p = 1.6075  # Knud Thomsen's approximation of the area, within ~1 %
    area = 4 * np.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)

    def sample(rng, n):
        u = _rejection(rng, n, lambda m: _unit(rng.standard_normal((m, 3))),
                       lambda u: np.linalg.norm(u * stretch, axis=1), stretch.max())
        return u * [a, b, c], _unit(u / [a, b, c])
    return [Surface(area, sample)]


def torus(major, minor, arc=TWO_PI):
    """Ring in the xy plane around the origin, tube radius `minor`; a partial ring spans `arc`
    centred on +x. Area density is proportional to the distance from the axis."""
    def sample(rng, n):
        u = rng.uniform(-arc / 2, arc / 2, n)
        v = _rejection(rng, n, lambda m: rng.uniform(0, TWO_PI, m),
                       lambda v: major + minor * np.cos(v), major + minor)
        ring = major + minor * np.cos(v)
        points = np.stack([ring * np.cos(u), ring * np.sin(u), minor * np.sin(v)], 1)
        normals = np.stack([np.cos(v) * np.cos(u), np.cos(v) * np.sin(u), np.sin(v)], 1)
        return points, normals
    return [Surface(arc * major * TWO_PI * minor, sample)]


def rotation(axis, angle):
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)]["xyz".index(axis)]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def placed(surfaces, offset=(0, 0, 0), rotate=None):
    """The surfaces moved by x -> rotate @ x + offset."""
    rotate = np.eye(3) if rotate is None else rotate

    def move(sample):
        def moved(rng, n):
            points, normals = sample(rng, n)
            return points @ rotate.T + offset, normals @ rotate.T
        return moved
    return [Surface(s.area, move(s.sample)) for s in surfaces]


# ---------------------------------------------------------------- shapes (y is up)
def airplane(rng):
    length, radius = rng.uniform(1.6, 2.4), rng.uniform(0.08, 0.16)
    span, chord, sweep = rng.uniform(1.2, 2.4), rng.uniform(0.2, 0.45), rng.uniform(0, 0.6)
    wing_x, wing_y = rng.uniform(-0.1, 0.2) * length, rng.uniform(-0.6, 0.4) * radius
    wings, engines = [], []
    engine_z = np.sort(rng.uniform(0.15, 0.42, rng.choice([1, 2])))
    engine_r, engine_len = rng.uniform(0.04, 0.09), rng.uniform(0.2, 0.4)
    for side in (-1, 1):
        half_wing = placed(box(chord, 0.03, span / 2), offset=(0, 0, side * span / 4))
        wings += placed(half_wing, (wing_x, wing_y, 0), rotation("y", -side * sweep))
        for z in engine_z * span * side:
            x = wing_x - abs(z) * np.tan(sweep) + 0.3 * chord - engine_len / 2
            engines += placed(frustum(engine_r, 0.85 * engine_r, engine_len),
                              (x, wing_y - engine_r - 0.03, z), rotation("z", -np.pi / 2))
    tail_chord, fin_height = rng.uniform(0.2, 0.4), rng.uniform(0.2, 0.45)
    tail_x = -length / 2 + tail_chord / 2 + 0.05
    stabiliser_y = fin_height if rng.uniform() < 0.3 else 0.0  # T-tail or conventional
    tail = (placed(box(tail_chord, fin_height, 0.025), (tail_x, fin_height / 2 + 0.3 * radius, 0))
            + placed(box(0.8 * tail_chord, 0.02, rng.uniform(0.4, 0.8)),
                     (tail_x, stabiliser_y + 0.3 * radius, 0)))
    return [ellipsoid(length / 2, radius, radius), wings, tail, engines]


def corner_legs(width, depth, inset, height, thickness, round_legs):
    """Four legs from the floor, `inset` in from the corners of a width x depth rectangle."""
    leg = (frustum(thickness / 2, thickness / 2, height) if round_legs
           else placed(box(thickness, height, thickness), (0, height / 2, 0)))
    x, z = width / 2 - inset - thickness / 2, depth / 2 - inset - thickness / 2
    return [s for sx in (-1, 1) for sz in (-1, 1) for s in placed(leg, (sx * x, 0, sz * z))]


def pedestal(height, radius, foot_radius):
    return frustum(radius, radius, height, False, False) + frustum(foot_radius, 0.6 * radius, 0.05)


def chair(rng):
    width, depth = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)
    seat_y, seat_t = rng.uniform(0.7, 1.1), rng.uniform(0.05, 0.15)
    back_h, back_t, tilt = rng.uniform(0.6, 1.4), rng.uniform(0.04, 0.12), rng.uniform(0, 0.35)
    back = placed(placed(box(width * rng.uniform(0.75, 1), back_h, back_t), (0, back_h / 2, 0)),
                  (0, seat_y + seat_t / 2, -depth / 2 + back_t / 2), rotation("x", -tilt))
    if rng.uniform() < 0.25:  # swivel chair
        legs = pedestal(seat_y - seat_t / 2, rng.uniform(0.03, 0.06), rng.uniform(0.3, 0.5))
    else:
        legs = corner_legs(width, depth, rng.uniform(0.02, 0.12), seat_y - seat_t / 2,
                           rng.uniform(0.04, 0.12), rng.uniform() < 0.5)
    return [placed(box(width, seat_t, depth), (0, seat_y, 0)), back, legs]


def table(rng):
    height, top_t = rng.uniform(0.6, 1.0), rng.uniform(0.03, 0.1)
    if rng.uniform() < 0.3:  # round
        radius = rng.uniform(0.5, 0.9)
        top = placed(frustum(radius, radius, top_t), (0, height - top_t, 0))
        legs = pedestal(height - top_t, rng.uniform(0.04, 0.1), rng.uniform(0.25, 0.5))
    else:
        width, depth = rng.uniform(1.0, 2.2), rng.uniform(0.6, 1.2)
        top = placed(box(width, top_t, depth), (0, height - top_t / 2, 0))
        inset, t = rng.uniform(0.0, 0.15), rng.uniform(0.04, 0.14)
        legs = corner_legs(width, depth, inset, height - top_t, t, rng.uniform() < 0.4)
        if rng.uniform() < 0.4:  # stretchers between the legs belong to the legs part
            for sz in (-1, 1):
                legs += placed(box(width - 2 * inset, t / 2, t / 2),
                               (0, 0.25 * height, sz * (depth / 2 - inset - t / 2)))
    return [top, legs]


def lamp(rng):
    base_r, base_h = rng.uniform(0.2, 0.45), rng.uniform(0.04, 0.14)
    pole_r, pole_h = rng.uniform(0.015, 0.05), rng.uniform(0.7, 1.6)
    base = (frustum(base_r, base_r * rng.uniform(0.5, 1), base_h) if rng.uniform() < 0.7
            else placed(box(2 * base_r, base_h, 2 * base_r), (0, base_h / 2, 0)))
    pole = placed(frustum(pole_r, pole_r, pole_h, False, False), (0, base_h, 0))
    top, shade_tilt = np.array([0, base_h + pole_h, 0]), 0.0
    if rng.uniform() < 0.35:  # desk lamp: an arm leaning out, the shade hanging from its end
        arm_len, arm_angle = rng.uniform(0.3, 0.8), rng.uniform(0.5, 1.3)
        pole += placed(frustum(pole_r, pole_r, arm_len, False, False), top,
                       rotation("z", -arm_angle))
        top = top + arm_len * np.array([np.sin(arm_angle), np.cos(arm_angle), 0])
        shade_tilt = rng.uniform(0.3, 1.2)
    shade_h = rng.uniform(0.2, 0.5)
    shade = (ellipsoid(*rng.uniform(0.15, 0.35, 3)) if rng.uniform() < 0.25 else
             placed(frustum(rng.uniform(0.2, 0.5), rng.uniform(0.05, 0.25), shade_h, False, False),
                    (0, -0.6 * shade_h, 0)))
    return [base, pole, placed(shade, top, rotation("z", -shade_tilt))]


def mug(rng):
    radius, height = rng.uniform(0.3, 0.5), rng.uniform(0.5, 1.2)
    body = frustum(radius, radius * rng.uniform(0.85, 1.2), height, top_cap=False)
    ring = torus(rng.uniform(0.15, 0.35) * height, rng.uniform(0.025, 0.06),
                 rng.uniform(np.pi, 1.4 * np.pi))
    return [body, placed(ring, (radius, rng.uniform(0.4, 0.6) * height, 0))]


def rocket(rng):
    radius, length = rng.uniform(0.1, 0.22), rng.uniform(1.2, 2.2)
    nose_h = rng.uniform(0.25, 0.7)
    nose = (placed(ellipsoid(radius, nose_h, radius), (0, length, 0)) if rng.uniform() < 0.4
            else placed(frustum(radius, 0, nose_h), (0, length, 0)))
    n_fins, fin_w, fin_h = rng.choice([3, 4]), rng.uniform(0.12, 0.35), rng.uniform(0.2, 0.55)
    fins = []
    for k in range(n_fins):
        fin = placed(box(fin_w, fin_h, 0.02), (radius + fin_w / 2, fin_h / 2, 0))
        fins += placed(fin, (0, 0, 0), rotation("y", TWO_PI * k / n_fins))
    return [frustum(radius, radius, length, top_cap=False), fins, nose]


def bottle(rng):
    radius, body_h = rng.uniform(0.2, 0.4), rng.uniform(0.6, 1.2)
    neck_r, shoulder_h = rng.uniform(0.06, 0.12), rng.uniform(0.1, 0.35)
    neck_h = rng.uniform(0.15, 0.4)
    return [frustum(radius, radius, body_h, top_cap=False),
            placed(frustum(radius, neck_r, shoulder_h, False, False), (0, body_h, 0)),
            placed(frustum(neck_r, neck_r, neck_h, False), (0, body_h + shoulder_h, 0))]


def guitar(rng):
    lower, upper, depth = rng.uniform(0.35, 0.5), rng.uniform(0.25, 0.38), rng.uniform(0.06, 0.14)
    neck_len = rng.uniform(0.8, 1.2)
    return [ellipsoid(lower, 1.1 * lower, depth),
            placed(ellipsoid(upper, 1.1 * upper, depth), (0, 1.1 * lower + 0.6 * upper, 0)),
            placed(box(0.1, neck_len, 0.05), (0, 1.1 * lower + upper + neck_len / 2, 0)),
            placed(box(0.18, 0.25, 0.05), (0, 1.1 * lower + upper + neck_len + 0.12, 0))]


def stool(rng):
    radius, height, n_legs = rng.uniform(0.18, 0.32), rng.uniform(0.5, 0.9), rng.choice([3, 4])
    splay, leg_r = rng.uniform(0, 0.2), rng.uniform(0.015, 0.035)
    legs = []
    for k in range(n_legs):
        leg = placed(frustum(leg_r, leg_r, height / np.cos(splay), False, False),
                     (0.8 * radius, 0, 0), rotation("z", splay))
        legs += placed(leg, (0, 0, 0), rotation("y", TWO_PI * k / n_legs))
    return [placed(frustum(radius, radius, 0.05), (0, height, 0)), legs]


def vase(rng):
    radii = rng.uniform([0.15, 0.3, 0.06, 0.1], [0.3, 0.5, 0.15, 0.25])  # foot, belly, neck, lip
    heights = rng.uniform([0.3, 0.3, 0.1], [0.7, 0.8, 0.3])
    surfaces, y = [], 0.0
    for k, h in enumerate(heights):
        surfaces += placed(frustum(radii[k], radii[k + 1], h, k == 0, False), (0, y, 0))
        y += h
    return [surfaces]


PART_CATEGORIES = {  # name: (part names, generator); global part ids follow this order
    "Airplane": (["fuselage", "wings", "tail", "engines"], airplane),
    "Chair": (["seat", "back", "legs"], chair),
    "Lamp": (["base", "pole", "shade"], lamp),
    "Mug": (["body", "handle"], mug),
    "Rocket": (["body", "fins", "nose"], rocket),
    "Table": (["top", "legs"], table),
}
CLASSES = {"airplane": airplane, "bottle": bottle, "chair": chair, "guitar": guitar,
           "lamp": lamp, "mug": mug, "rocket": rocket, "stool": stool, "table": table,
           "vase": vase}


# ---------------------------------------------------------------- sampling a shape
def sample_shape(rng, parts, n):
    """n area-uniform points of a shape given as parts (lists of surfaces), normalised to the unit
    sphere, then a random yaw, a small tilt and noise.
    -> xyz (n, 3), normals (n, 3), part index (n,)"""
    surfaces = [(label, s) for label, part in enumerate(parts) for s in part]
    areas = np.array([s.area for _, s in surfaces])
    counts = rng.multinomial(n, areas / areas.sum())
    xyz, normals, labels = [], [], []
    for (label, surface), count in zip(surfaces, counts):
        if count == 0:  # a tiny surface can get no points (rejection samplers need n > 0)
            continue
        points, point_normals = surface.sample(rng, count)
        xyz.append(points)
        normals.append(point_normals)
        labels.append(np.full(count, label))
    order = rng.permutation(n)  # no part order in the file: ModelNet readers take the first N
    xyz, normals, labels = (np.concatenate(a)[order] for a in (xyz, normals, labels))
    pose = (rotation("y", rng.uniform(0, TWO_PI)) @ rotation("x", rng.normal(0, 0.08))
            @ rotation("z", rng.normal(0, 0.08)))
    xyz = normalize_unit_sphere(xyz) @ pose.T + rng.normal(0, NOISE, xyz.shape)
    return xyz, normals @ pose.T, labels
