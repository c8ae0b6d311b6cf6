"""What a new user meets: the extras the README installs give every command it shows, the screen
starts without flags, commands find their data where the user is, and the runtime stays quiet."""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _extra(meta: dict, name: str) -> set[str]:
    """The requirement names an extra brings, its own extras followed (``bmc-edge[a,b]``)."""
    out: set[str] = set()
    for req in meta["optional-dependencies"][name]:
        m = re.match(r"bmc-edge\[([^\]]+)\]", req)
        if m:
            for inner in m.group(1).split(","):
                out |= _extra(meta, inner.strip())
        else:
            out.add(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower())
    return out


def test_the_training_install_runs_every_device_command():
    """``pip install -e ".[train,dev]"`` (the README's first command) brings all the edge extra
    brings, so ``bmc edge ui`` and every other device verb run on it."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    edge, train = _extra(meta, "edge"), _extra(meta, "train")
    assert "waitress" in edge and "ai-edge-litert" in edge
    assert edge <= train, f"the edge extra's {sorted(edge - train)} are missing from [train]"
    assert "tensorflow" not in edge and "keras" not in edge  # the device never gets TensorFlow


def test_the_screen_starts_without_flags_in_a_per_user_folder(tmp_path):
    """``bmc edge ui`` alone: this user's storage folder, said on start-up, and a page served."""
    from bmc.edge_app.config import DEVICE_CONFIG

    if DEVICE_CONFIG.is_file():
        pytest.skip(f"{DEVICE_CONFIG} exists on this machine: the screen would take its storage")
    env = {k: v for k, v in os.environ.items() if k != "XDG_DATA_HOME"}
    env["HOME"] = str(tmp_path)
    p = subprocess.Popen(
        [sys.executable, "-m", "bmc.cli", "edge", "ui", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("bmc screen on"):
                break
        said = "".join(lines)
        folder = tmp_path / ".local" / "share" / "bmc" / "sessions"
        assert f"sessions are kept in {folder}" in said, said
        assert folder.is_dir()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", said).group(1))
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/", headers={"Host": f"127.0.0.1:{port}"})
        r = c.getresponse()
        assert r.status == 200 and b"Sessions" in r.read()
    finally:
        p.terminate()
        p.wait(30)


def test_a_benchmark_without_its_data_says_where_it_looked(tmp_path):
    """Run from a folder that is not the repository, ``bmc bench bccd`` with no ``--bccd``: one line
    naming the folder it looked for and the option, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "BMC_DATA"}
    p = subprocess.run(
        [sys.executable, "-m", "bmc.cli", "bench", "bccd"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert f"shared/data/bccd (from {tmp_path}): no such data folder; give --bccd FOLDER" in p.stderr, p.stderr


def test_a_count_prints_no_runtime_banner(bccd, tmp_path):
    """``bmc edge run`` says what a technician needs: no LiteRT INFO banner on either stream."""
    fields = tmp_path / "fields"
    fields.mkdir()
    for f in sorted((bccd / "JPEGImages").glob("*.jpg"))[:2]:
        (fields / f.name).symlink_to(f)
    p = subprocess.run(
        [sys.executable, "-m", "bmc.cli", "edge", "run", fields, "--out", tmp_path / "s", "--headless"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "session finished: 2 frames" in p.stdout
    assert "XNNPACK" not in p.stdout + p.stderr, p.stderr


def test_the_held_back_runtime_lines_that_are_not_its_banner_still_reach_stderr(tmp_path):
    """The banner filter keeps every other line the runtime writes to file descriptor 2."""
    code = (
        "import os\n"
        "from bmc.edge_app.backends.litert import quiet_runtime\n"
        "with quiet_runtime():\n"
        "    os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n')\n"
        "    os.write(2, b'WARNING: a real warning\\n')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr == "WARNING: a real warning\n"


def test_the_deploy_readme_names_the_package_that_exists():
    text = (ROOT / "edge_app" / "deploy" / "README.md").read_text() + (ROOT / "README.md").read_text()
    assert not re.search(r"pip install ['\"]?bmc\[", text), "the package is bmc-edge, not bmc"
