"""What a user sees in TensorBoard: a real ``tensorboard`` server, started with exactly the flags the
README prints, over a real fit's log directory, read through its HTTP data API.

Without ``--samples_per_plugin`` TensorBoard keeps 10 images per tag (dropping step 0 of 13), and with
``images=0`` (what the README printed before) its image dashboard asked for zero samples and showed
empty cards: every heatmap of every logging point must come back.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_repsim.callbacks import RepresentationSimilarity
from tests.callbacks.test_similarity import PROBE, Net, train_loader

ROOT = Path(__file__).resolve().parents[2]


def readme_tensorboard_command() -> list[str]:
    """The arguments of the first ``tensorboard --logdir runs ...`` command the README prints."""
    match = re.search(r"`(tensorboard --logdir runs[^`]*)`", (ROOT / "README.md").read_text())
    assert match, "the README prints no tensorboard command"
    return shlex.split(match.group(1))[1:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str, **query: str) -> object:
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A fit with 13 logging points (step 0 and every 2 of 24 steps), two references: 4 heatmap series."""
    root = tmp_path_factory.mktemp("runs")
    monitor = RepresentationSimilarity(
        probe=PROBE,
        reference=["init", "previous"],
        measures=("linear_cka", "rv2"),
        every_n_train_steps=2,
        write_files=False,
    )
    trainer = pl.Trainer(
        max_steps=24,
        accelerator="cpu",
        logger=TensorBoardLogger(str(root), name="net", version=0),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Net(), train_loader())
    return root, list(range(0, 25, 2))


def test_readme_tensorboard_command_shows_every_heatmap(logged_run):
    root, steps = logged_run
    tensorboard = Path(sys.executable).parent / "tensorboard"
    if not tensorboard.exists():
        pytest.skip("the tensorboard console script is not installed next to this Python")
    args = readme_tensorboard_command()
    args[args.index("--logdir") + 1] = str(root)  # the README's `runs`, here the fit's log directory
    port = free_port()
    server = subprocess.Popen(
        [str(tensorboard), *args, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        expected = {f"repsim/{m}/{r}/heatmap" for m in ("linear_cka", "rv2") for r in ("init", "previous")}
        deadline, tags = time.monotonic() + 120, {}
        while time.monotonic() < deadline:  # the server loads the event files in the background
            try:
                tags = get(port, "/data/plugin/images/tags").get("net/version_0", {})
            except OSError:
                tags = {}
            if expected <= set(tags):
                break
            assert server.poll() is None, server.stdout.read()
            time.sleep(1)
        assert expected <= set(tags), f"tags served: {sorted(tags)}"
        for tag in sorted(expected):
            images = get(port, "/data/plugin/images/images", run="net/version_0", tag=tag, sample="0")
            served = [entry["step"] for entry in images]
            want = steps if tag.endswith("init/heatmap") else steps[1:]  # "previous" starts at the 2nd point
            assert served == want, f"{tag}: TensorBoard serves steps {served}, the fit logged {want}"
    finally:
        server.terminate()
        server.wait(timeout=30)
