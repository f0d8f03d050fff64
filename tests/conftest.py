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


@pytest.fixture
def needs_compiler():
    """Skips without the C kernels (checked when the test runs, not at collection)."""
    from lib.ops import native
    if native.library() is None:
        pytest.skip("no C compiler for lib/ops/csrc/")
