"""The Dockerfile: hadolint-clean (and hadolint does catch a bad one), and consistent with the chart and the
package: the CPU target installs no torch, the user is the chart's runAsUser, the defaults name real settings.
The image itself is built and run by `make image-test` (deploy/image-test.sh), outside `make test`."""

from __future__ import annotations

import re
import tomllib

import msgspec
import yaml

from tests.deploy.conftest import CHART, ROOT, run

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes(hadolint):
    done = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_a_bad_dockerfile(hadolint, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /src && pip install .\nUSER root\n")
    done = run([hadolint, "--no-color", str(bad)])
    assert done.returncode != 0
    assert "DL3006" in done.stdout and "DL3003" in done.stdout  # untagged base, cd instead of WORKDIR


def test_targets_base_and_stages():
    steps = instructions()
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    assert args["BASE_IMAGE"] == "python:3.11-slim-bookworm"
    assert args["TARGET"] == "cpu"
    stages = {
        a.split(" AS ")[1].strip(): a.split(" AS ")[0].strip()
        for w, a in steps
        if w == "FROM" and " AS " in a
    }
    assert stages["base"] == "${BASE_IMAGE}"
    assert stages["build"] == "build-${TARGET}"
    assert {"build-cpu", "build-gpu", "runtime"} <= stages.keys()
    # The last stage is what `docker build` produces without --target.
    assert [a for w, a in steps if w == "FROM"][-1].endswith("AS runtime")


def extras_installed(stage: str) -> set[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    body = text.split(f"AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
    (extras,) = re.findall(r'pip install "\.\[([a-z,-]+)\]"', body)
    return set(extras.split(","))


def test_cpu_target_installs_no_torch_and_gpu_target_does():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    optional = project["optional-dependencies"]

    def requirements(extras: set[str]) -> set[str]:
        names = set()
        for req in project["dependencies"] + [r for e in extras for r in optional[e]]:
            names.add(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower())
        return names

    cpu = requirements(extras_installed("build-cpu"))
    assert "onnxruntime" in cpu and "gunicorn" in cpu and "uvicorn-worker" in cpu
    assert not cpu & {"torch", "triton", "onnxruntime-gpu"}, "the CPU image must stay torch-free"
    gpu = requirements(extras_installed("build-gpu"))
    assert {"torch", "triton", "onnxruntime-gpu"} <= gpu
    assert "onnxruntime" not in gpu, "onnxruntime and onnxruntime-gpu overwrite each other"


def test_runtime_user_healthcheck_and_entrypoint_match_the_chart():
    steps = instructions()
    runtime = steps[max(i for i, (w, a) in enumerate(steps) if w == "FROM") :]
    (user,) = [a for w, a in runtime if w == "USER"]
    uid, gid = (int(x) for x in user.split(":"))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert (
        uid == values["podSecurityContext"]["runAsUser"] and gid == values["podSecurityContext"]["runAsGroup"]
    )
    assert uid != 0

    (health,) = [a for w, a in runtime if w == "HEALTHCHECK"]
    assert "/health" in health and "INSTRUCTLM_PORT" in health
    (entry,) = [a for w, a in runtime if w == "ENTRYPOINT"]
    assert yaml.safe_load(entry) == ["instructlm", "serve"]
    (expose,) = [a for w, a in runtime if w == "EXPOSE"]
    assert int(expose) == values["server"]["port"]


def test_image_defaults_are_service_settings():
    """ENV INSTRUCTLM_* in the image are Settings fields (the service ignores unknown names) and the image's
    model path is where the chart expects it."""
    from export.custom_ops import ENV_LIBRARY
    from service.settings import Settings, load_settings

    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    env = dict(re.findall(r"\b(INSTRUCTLM_[A-Z_]+)=(\S+)", text.split("AS runtime", 1)[1]))
    # The one that is not a service setting: where the runner finds the SlotAttention op library, which the
    # image's ops stage builds and the runtime stage copies to exactly that path.
    lib = env.pop(ENV_LIBRARY)
    assert f"COPY --from=ops {lib} {lib}" in text
    fields = {f.encode_name for f in msgspec.inspect.type_info(Settings).fields}
    assert {k.removeprefix("INSTRUCTLM_").lower() for k in env} <= fields
    settings = load_settings(environ=env)
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert settings.model == values["model"]["path"] == values["model"]["initContainer"]["sourcePath"]
    assert settings.host == "0.0.0.0" and settings.port == values["server"]["port"]


def test_dockerignore_keeps_the_context_small_but_lets_bundles_in():
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip()[:1] not in ("", "#")
    ]
    for heavy in (".git", ".venv", ".tools", "runs/**", "tests", "data/**"):
        assert heavy in lines, heavy
    assert "!runs/*/bundle/**" in lines and "!deploy/empty-bundle/**" in lines
    # Every path the Dockerfile copies from the context exists and is not ignored.
    copied = [a.split()[0] for w, a in instructions() if w == "COPY" and not a.startswith("--from")]
    for src in copied:
        if src.startswith("$"):
            continue
        assert (ROOT / src).exists(), src
        assert src not in lines, f"{src} is copied but ignored"


def test_image_ships_the_task_endpoints_default_data():
    """The customer-service endpoint loads its knowledge base and intent labels at start (relative to the working
    directory, /app): the image must carry the defaults, or the server refuses to start."""
    from service.tasks.settings import CustomerServiceSettings

    steps = instructions()
    runtime = steps[max(i for i, (w, a) in enumerate(steps) if w == "FROM") :]
    (workdir,) = [a for w, a in runtime if w == "WORKDIR"]
    shipped = set()
    for word, args in runtime:
        if word == "COPY" and not args.startswith("--from"):
            *sources, dest = args.split()
            shipped |= {f"{dest.rstrip('/')}/{src.rsplit('/', 1)[-1]}" for src in sources}
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    defaults = CustomerServiceSettings()
    for relative in (defaults.knowledge_base, defaults.intent_labels):
        assert f"{workdir}/{relative}" in shipped, f"{relative} is not copied to {workdir}"
        assert f"!{relative}" in lines, f"{relative} is excluded from the build context"
        assert (ROOT / relative).is_file()
