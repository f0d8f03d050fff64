import pytest

from lib.policy_file import parse_keep, read_policy, write_policy


def test_round_trip_and_keep_flag(tmp_path):
    path = str(tmp_path / "policy.json")
    write_policy(path, {"bits": {"a": 3, "b": None}, "metric": 0.5})
    assert read_policy(path, ["a", "b", "c"]) == {"a": 3, "b": None}
    assert parse_keep("") == "off" and parse_keep("fp32") is None and parse_keep("8") == 8


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"metric": 1}', "no 'bits' mapping"),
    ('{"bits": {"ghost": 4}}', "layers not in the model: ghost"),
])
def test_bad_policy_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "policy.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        read_policy(str(path), ["a"])
    assert str(path) in str(err.value)


def test_bad_keep_values():
    for value in ("eight", "0", "33"):
        with pytest.raises(ValueError, match="--keep-first-last"):
            parse_keep(value)
