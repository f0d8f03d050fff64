import json

import pytest

from lib.policy_file import PolicyFile, parse_keep, recorded_keep, write_policy


def test_round_trip_and_keep_flag(tmp_path):
    path = str(tmp_path / "policy.json")
    write_policy(path, {"bits": {"a": 3, "b": None, "c": "fp32", "d": 32}, "metric": 0.5})
    assert PolicyFile(path).bits(["a", "b", "c", "d"]) == {"a": 3, "b": None, "c": None, "d": 32}
    assert parse_keep("") == "off" and parse_keep("fp32") is None and parse_keep("8") == 8


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"metric": 1}', "no 'bits' mapping"),
    ('[{"bits": {"a": 4}}]', "no 'bits' mapping"),
    ('{"bits": {"ghost": 4}}', "layers not in the model: ghost"),
    ('{"bits": {"a": 3.7}}', "layer a: bit width 3.7 is not an integer"),
    ('{"bits": {"a": true}}', "layer a: bit width true is not an integer"),
    ('{"bits": {"a": 33}}', "layer a: bit width 33 is not an integer"),
    ('{"bits": {"a": 0}}', "layer a: bit width 0 is not an integer"),
    ('{"bits": {"a": "four"}}', 'layer a: bit width "four" is not an integer'),
    ('{"bits": {"a": "3"}}', 'layer a: bit width "3" is not an integer'),
])
def test_bad_policy_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "policy.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        PolicyFile(str(path)).bits(["a"])
    assert str(path) in str(err.value)


def test_a_policy_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "policy.json"
    path.write_bytes(b'{"bits": {"a": 4},\n "note": "\xff"}')
    with pytest.raises(ValueError, match=f"^{path}: line 2: not UTF-8"):
        PolicyFile(str(path))


def test_bad_keep_values():
    for value in ("eight", "0", "33"):
        with pytest.raises(ValueError, match="--keep-first-last"):
            parse_keep(value)


@pytest.mark.parametrize("value, kept", [(None, "off"), ('"fp32"', None), ('"8"', 8), ("8", 8),
                                         ('"none"', "off")])  # search.py wrote "none" verbatim
def test_a_policy_files_keep_first_last_as_search_writes_it(tmp_path, value, kept):
    path = tmp_path / "policy.json"
    keep = "" if value is None else f', "keep_first_last": {value}'
    path.write_text('{"bits": {}' + keep + "}")
    assert PolicyFile(str(path)).keep() == kept


@pytest.mark.parametrize("value", ["[8]", '{"bits": 8}', '"abc"', "8.7", "true", "0", '"33"'])
def test_a_bad_keep_first_last_in_a_policy_file_names_the_file(tmp_path, value):
    """Not a traceback (a list), not the --keep-first-last flag the user never gave ("abc"),
    not 8 for 8.7."""
    path = tmp_path / "policy.json"
    path.write_text('{"bits": {}, "keep_first_last": ' + value + "}")
    with pytest.raises(ValueError) as err:
        PolicyFile(str(path)).keep()
    assert str(err.value).startswith(f"{path}: keep_first_last ") and "--keep" not in str(err.value)


def test_keep_first_last_is_recorded_as_null_when_nothing_is_kept():
    assert [recorded_keep(flag) for flag in ("", "none", "8", "fp32")] == [None, None, "8", "fp32"]


def test_a_policy_files_method(tmp_path):
    path = tmp_path / "policy.json"
    for method in ("kmeans", "linear"):
        path.write_text('{"bits": {}, "method": "%s"}' % method)
        assert PolicyFile(str(path)).method() == method
    path.write_text('{"bits": {}}')  # older policies do not record it
    assert PolicyFile(str(path)).method() is None
    path.write_text('{"bits": {}, "method": "kmean"}')
    with pytest.raises(ValueError, match=f'^{path}: method "kmean" is not one of kmeans, linear'):
        PolicyFile(str(path)).method()


def test_a_policy_searched_on_another_model_is_refused(tmp_path):
    """Its widths were chosen for that model; policies without the record are not checked."""
    from lib.checkpoint import file_sha256
    searched, other = tmp_path / "a.pt", tmp_path / "b.pt"
    searched.write_bytes(b"model a")
    other.write_bytes(b"model b")
    path = tmp_path / "policy.json"
    write_policy(str(path), {"bits": {}, "checkpoint": str(searched),
                             "checkpoint_sha256": file_sha256(str(searched))})
    PolicyFile(str(path)).check_searched_on(str(searched), file_sha256(str(searched)))
    with pytest.raises(ValueError, match=f"searched on another model than {other}") as err:
        PolicyFile(str(path)).check_searched_on(str(other), file_sha256(str(other)))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    write_policy(str(path), {"bits": {}})
    PolicyFile(str(path)).check_searched_on(str(other), file_sha256(str(other)))


def test_a_policy_file_must_list_the_layers_the_forward_calls_and_only_those(tmp_path):
    """search.py leaves out a layer the forward never calls ("unused", fp32): finetune.py
    refused such a policy as lacking a width for it; one that leaves out a called layer is
    still refused."""
    path = tmp_path / "policy.json"
    write_policy(str(path), {"bits": {"stem": 4, "head": 8}})
    policy = PolicyFile(str(path))
    bits = policy.bits(["stem", "mid", "head", "unused"])
    assert bits == {"stem": 4, "head": 8}
    policy.check_listed(bits, ["stem", "head"])
    with pytest.raises(ValueError) as err:
        policy.check_listed(bits, ["stem", "mid", "head"])
    assert str(err.value) == (f"{path}: 1 of the 3 layers the model's forward calls have no bit "
                              f"width: mid")


@pytest.mark.parametrize("keep, first, last, refused", [
    ('"8"', 8, 8, None), ('"fp32"', None, 32, None), ("null", 2, 5, None),
    ('"8"', 2, 8, "stem at 2 bits"), ('"8"', 8, None, "head at fp32"),
    ('"fp32"', 8, 8, "stem at 8 bits and head at 8 bits")])
def test_a_policy_files_kept_layers_must_have_the_width_it_records(tmp_path, keep, first, last,
                                                                    refused):
    """A hand-edited policy.json saying the first and last layers are kept at 8 bits while its
    bits hold 2 was fine-tuned with its bits and recorded as kept at 8."""
    path = tmp_path / "policy.json"
    write_policy(str(path), {"bits": {"stem": first, "mid": 3, "head": last},
                             "keep_first_last": json.loads(keep)})
    policy = PolicyFile(str(path))
    bits = policy.bits(["stem", "mid", "head"])
    if refused is None:
        policy.check_kept(bits, ["stem", "head"])
        return
    with pytest.raises(ValueError) as err:
        policy.check_kept(bits, ["stem", "head"])
    kept = "fp32" if keep == '"fp32"' else "8 bits"
    assert str(err.value) == (f"{path}: keep_first_last {json.loads(keep)} says the first and "
                              f"last layers are kept at {kept}, but its bits hold {refused}; "
                              f"make the two agree")
