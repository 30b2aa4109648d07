"""Screenshots of what a user sees in TensorBoard, for the README (``make screenshots``).

Starts ``tensorboard`` with exactly the flags the README prints over a log directory (by default
the ``runs/`` that ``make demo`` writes), lets headless Chromium render the IMAGES, SCALARS and
CUSTOM SCALARS dashboards, and writes one PNG per dashboard to ``docs/figures/``. Needs Debian's
``chromium`` (``apt-get install chromium``) or ``google-chrome`` on PATH.

    python docs/screenshots.py --logdir runs
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DASHBOARDS = ("images", "scalars", "custom_scalars")
HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("no headless browser found: install Debian's chromium (apt-get install chromium) or google-chrome")


def _wait_until_serving(url: str, server: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"tensorboard exited with code {server.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url + "/data/runs", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"tensorboard did not answer at {url} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs", help="log directory to serve (default: runs)")
    parser.add_argument("--out", default=str(HERE / "figures"), help="where the PNGs go (default: docs/figures)")
    parser.add_argument("--size", default="1600,1100", help="browser window WIDTH,HEIGHT (default: 1600,1100)")
    args = parser.parse_args(argv)
    if not Path(args.logdir).is_dir():
        sys.exit(f"{args.logdir} is not a directory: run `make demo` first, or pass --logdir")
    browser = _browser()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # the README's command, plus a fixed host and port
    command = [str(tensorboard), "--logdir", args.logdir, "--samples_per_plugin", "images=1000"]
    server = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stderr=subprocess.DEVNULL)
    try:
        _wait_until_serving(url, server)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for dashboard in DASHBOARDS:
            target = Path(args.out) / f"tensorboard_{dashboard}.png"
            subprocess.run(
                [
                    browser,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    f"--window-size={args.size}",
                    "--virtual-time-budget=20000",  # lets the dashboard fetch and draw its data
                    f"--screenshot={target}",
                    f"{url}/#{dashboard}",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=180,
            )
            print(f"{dashboard}: {target}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
