"""Suite-wide fixtures."""

import os

import pytest


@pytest.fixture(autouse=True)
def fresh_ddp_port():
    """Each test's ddp_spawn picks a free port of its own.

    Lightning writes MASTER_PORT into the environment of the process that spawns the workers, so without
    this every later DDP test in the session reuses the first one's port, and fails now and then while
    that port is still held (TIME_WAIT) by the previous process group.
    """
    os.environ.pop("MASTER_PORT", None)
    yield
    os.environ.pop("MASTER_PORT", None)
