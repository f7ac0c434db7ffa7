"""A user who installs only `ragrt[cpu]` (no torch) can answer from a bundle."""
import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("RAGRT_SKIP_VENV_TEST") == "1", reason="RAGRT_SKIP_VENV_TEST=1")
def test_ask_in_a_venv_without_torch(tiny_bundle, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[cpu]"],
                             capture_output=True, text=True, timeout=900)
    if install.returncode != 0 and "No matching distribution" in install.stderr + install.stdout:
        pytest.skip(f"the package index cannot be reached: {install.stderr.strip().splitlines()[-1]}")
    assert install.returncode == 0, install.stderr
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "True", "torch must not be installed by ragrt[cpu]"
    out = subprocess.run([str(env_dir / "bin" / "ragrt"), "ask", "--bundle", str(tiny_bundle), "--json",
                          "--max-new-tokens", "4", "How do I copy a list?"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["sources"]
