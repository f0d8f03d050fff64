"""OFF meshes (the format of ModelNet40.zip / ModelNet10.zip) and area-weighted sampling of points
on their surface.

An OFF file: a header line `OFF`, a line `V F E` (vertex, face, edge counts), V lines `x y z`,
then F lines `k i_1 .. i_k` (a polygon of k vertex indices, fanned into k - 2 triangles). Some
ModelNet files join the first two lines (`OFF490 518 0`); `#` comments and blank lines are
skipped. A malformed file, an empty mesh or one whose faces all have zero area is a one-line
error naming the file. Zero-area faces among others get no points (their area is zero), and
non-manifold meshes are read as they are: sampling needs neither orientation nor closedness.
"""
import warnings

import numpy as np

from lib.data.transforms import normalize_unit_sphere


def read_off(path):
    """-> vertices (V, 3) float64, triangles (T, 3) int64."""
    with open(path, errors="replace") as f:
        lines = [(number, line.split("#", 1)[0].strip()) for number, line in enumerate(f, 1)]
    lines = [(number, text) for number, text in lines if text]  # (line number, text)
    if not lines or not lines[0][1].startswith("OFF"):
        raise ValueError(f"{path}: not an OFF file (no `OFF` header)")
    counts, body = lines[0][1][len("OFF"):].split(), lines[1:]  # "OFF490 518 0" joins them
    if not counts:  # the usual form: the counts on a line of their own
        if not body:
            raise ValueError(f"{path}: empty mesh (no vertex and face counts)")
        counts, body = body[0][1].split(), body[1:]
    try:
        num_vertices, num_faces = int(counts[0]), int(counts[1])
    except (ValueError, IndexError):
        raise ValueError(f"{path}: expected `vertices faces edges` counts after OFF, found "
                         f"{' '.join(counts)!r}") from None
    if num_vertices <= 0 or num_faces <= 0:
        raise ValueError(f"{path}: empty mesh ({num_vertices} vertices, {num_faces} faces)")
    if len(body) < num_vertices + num_faces:
        raise ValueError(f"{path}: the header promises {num_vertices} vertices and {num_faces} "
                         f"faces, the file holds {len(body)} lines after it")
    vertices = parse_vertices(path, body[:num_vertices])
    return vertices, parse_faces(path, body[num_vertices:num_vertices + num_faces], num_vertices)


def fast_table(lines, dtype, usecols=None):
    """numpy's C parser over the lines' texts, or None where it refuses them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.loadtxt([text for _, text in lines], dtype=dtype, ndmin=2, usecols=usecols,
                              comments=None)
    except ValueError:
        return None


def parse_vertices(path, lines):
    vertices = fast_table(lines, np.float64, usecols=(0, 1, 2))
    if vertices is None or not np.isfinite(vertices).all():
        for number, text in lines:  # name the first bad line
            fields = text.split()
            try:
                ok = len(fields) >= 3 and np.isfinite([float(v) for v in fields[:3]]).all()
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{path}: line {number}: not a vertex `x y z`: {text!r}")
    return vertices


def parse_faces(path, lines, num_vertices):
    table = fast_table(lines, np.int64)
    if (table is not None and table.shape[1] == 4 and (table[:, 0] == 3).all()
            and table[:, 1:].min() >= 0 and table[:, 1:].max() < num_vertices):
        return table[:, 1:]  # all triangles, the usual ModelNet file
    triangles = []  # polygons (fanned into triangles), or a bad line to name
    for number, text in lines:
        try:
            indices = [int(v) for v in text.split()]
        except ValueError:
            raise ValueError(f"{path}: line {number}: not a face `k i_1 .. i_k`: "
                             f"{text!r}") from None
        k, polygon = indices[0], indices[1:1 + indices[0]]
        if k < 3 or len(polygon) != k:
            raise ValueError(f"{path}: line {number}: degenerate face (a face needs k >= 3 "
                             f"vertex indices, found {text!r})")
        if min(polygon) < 0 or max(polygon) >= num_vertices:
            raise ValueError(f"{path}: line {number}: face refers to a vertex outside "
                             f"0..{num_vertices - 1}")
        triangles += [(polygon[0], polygon[i], polygon[i + 1]) for i in range(1, k - 1)]
    return np.array(triangles, dtype=np.int64)


def sample_surface(path, vertices, triangles, num_points, rng):
    """num_points points uniform on the surface (a face drawn by area, then a uniform point in
    it) with the face normals: (num_points, 6) float32 `x y z nx ny nz`, centred and scaled to
    the unit sphere like modelnet40_normal_resampled."""
    corners = vertices[triangles]  # (T, 3 corners, 3)
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    areas = np.linalg.norm(cross, axis=1) / 2
    if not areas.sum() > 0:
        raise ValueError(f"{path}: all {len(triangles)} faces are degenerate (zero area)")
    face = rng.choice(len(triangles), num_points, p=areas / areas.sum())
    u, v = rng.random(num_points), rng.random(num_points)
    flip = u + v > 1  # fold the unit square onto the triangle
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    a, b, c = corners[face, 0], corners[face, 1], corners[face, 2]
    points = a + u[:, None] * (b - a) + v[:, None] * (c - a)
    normals = cross[face] / (2 * areas[face, None])
    return np.column_stack([normalize_unit_sphere(points), normals]).astype(np.float32)
