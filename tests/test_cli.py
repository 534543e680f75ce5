"""The `instructlm` command: verbs are listed, user errors are one line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "instructlm", *args], capture_output=True, text=True)


def test_model_info_prints_config_and_size(tiny_checkpoint, tiny_model):
    out = run("model", "info", str(tiny_checkpoint))
    assert out.returncode == 0, out.stderr
    assert f"{tiny_model.num_parameters():,}" in out.stdout
    assert "num_key_value_heads" in out.stdout
    info = json.loads(run("model", "info", "--json", str(tiny_checkpoint)).stdout)
    assert info["config"]["model_type"] == "llama"


def test_user_error_is_one_line_with_exit_2(tmp_path):
    out = run("model", "info", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_help_lists_the_verbs_without_importing_torch():
    code = (
        "import sys; from instructlm.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
