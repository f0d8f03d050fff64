import os
import sys

import pytest

# Tests import the repository's packages and the shared toy fixtures in tests/.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


@pytest.fixture(autouse=True)
def auto_ops_backend():
    """Every test starts and ends on lib.ops' "auto" backend (some switch to "reference")."""
    from lib import ops
    ops.set_backend("auto")
    yield
    ops.set_backend("auto")


@pytest.fixture(autouse=True)
def notes_said_afresh():
    """Every test is a process of its own to the readers' remarks, which a process prints once
    (lib.data.note): a module's fixture folder would otherwise be remarked on in its first test
    only."""
    from lib import data
    data.NOTES_PRINTED.clear()


@pytest.fixture
def needs_compiler():
    """Skips without the C kernels (checked when the test runs, not at collection)."""
    from lib.ops import native
    if native.library() is None:
        pytest.skip("no C compiler for lib/ops/csrc/")
