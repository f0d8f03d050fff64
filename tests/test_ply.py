"""PLY files as viewers expect them: the exact PLY 1.0 header, then one packed little-endian
record per point; read_ply gives back what write_ply wrote."""
import numpy as np
import pytest

from lib.ply import label_dtype, read_ply, write_ply


def test_header_and_records_follow_the_ply_spec(tmp_path):
    xyz = np.array([[0.0, 1.0, 2.0], [-1.5, 0.25, 3.0]], dtype=np.float32)
    rgb = np.array([[255, 0, 0], [0, 128, 255]], dtype=np.uint8)
    path = str(tmp_path / "cloud.ply")
    write_ply(path, xyz, rgb, {"label": np.array([3, 49], np.uint8),
                               "pred": np.array([3, 300], np.uint16)}, ["ids 3=wing 49=leg"])
    data = open(path, "rb").read()
    header = ("ply\nformat binary_little_endian 1.0\ncomment ids 3=wing 49=leg\n"
              "element vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\n"
              "property uchar label\nproperty ushort pred\nend_header\n").encode()
    assert data.startswith(header)
    record = np.dtype([("xyz", "<f4", 3), ("rgb", "u1", 3), ("label", "u1"), ("pred", "<u2")])
    assert len(data) == len(header) + 2 * record.itemsize  # packed: 12 + 3 + 1 + 2 bytes
    table = np.frombuffer(data[len(header):], dtype=record)
    np.testing.assert_array_equal(table["xyz"], xyz)
    np.testing.assert_array_equal(table["rgb"], rgb)
    assert table["label"].tolist() == [3, 49] and table["pred"].tolist() == [3, 300]

    fields, comments = read_ply(path)
    assert comments == ["ids 3=wing 49=leg"] and fields["pred"].tolist() == [3, 300]
    np.testing.assert_array_equal(np.stack([fields["x"], fields["y"], fields["z"]], 1), xyz)


def test_label_type_is_the_smallest_that_holds_the_ids():
    assert [label_dtype(n).itemsize for n in (13, 256, 257, 70000)] == [1, 1, 2, 4]


def test_a_field_of_the_wrong_length_or_type_is_an_error(tmp_path):
    xyz = np.zeros((3, 3))
    with pytest.raises(ValueError, match="field 'label' must hold 3 values"):
        write_ply(str(tmp_path / "a.ply"), xyz, fields={"label": np.zeros(2, np.uint8)})
    with pytest.raises(ValueError, match="field 'pred'"):
        write_ply(str(tmp_path / "a.ply"), xyz, fields={"pred": np.zeros(3, np.float64)})
    assert not list(tmp_path.iterdir())  # nothing half-written
