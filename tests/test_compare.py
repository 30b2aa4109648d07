"""Tests of compare(): every layer of one model against every layer of another on one probe."""
import pytest


@pytest.mark.parametrize("first", [
    "import lightning_repsim.compare",
    "import tempfile, torch; from lightning_repsim.store import SnapshotStore, similarity_between\n"
    "with tempfile.TemporaryDirectory() as tmp:\n"
    "    s = SnapshotStore.create(tmp, probe_hash='p', n=4); s.add(0, {'x': torch.randn(4, 2)})\n"
    "    similarity_between(s, s)",  # loads the submodule lightning_repsim.compare
    "",
])
def test_package_compare_is_the_function_whatever_was_imported_before(first):
    """The submodule lightning_repsim.compare must not replace the function of that name."""
    import subprocess
    import sys

    code = "\n".join([
        first,
        "import lightning_repsim",
        "from lightning_repsim import Comparison, compare",
        "assert callable(compare) and compare is lightning_repsim.compare, compare",
        "assert Comparison.__name__ == 'Comparison'",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
