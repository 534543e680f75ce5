"""The Helm chart: values, schema and README agree; every documented option renders to manifests that
kubernetes-validate accepts; the manifests carry the probes, drain timing and security settings production needs."""

from __future__ import annotations

import copy
import re

import jsonschema
import msgspec
import pytest
import yaml

from deploy.chart_readme import leaf_paths, load_chart, render_table, schema_node
from tests.deploy.conftest import CHART, CI_VALUES, ROOT, Rendered, render, run

# Names of the documented option files under helm/instructlm/ci/ (tests below rely on each of them).
OPTIONS = {p.name.removesuffix("-values.yaml") for p in CI_VALUES}


def all_key_paths(values: dict, prefix: tuple[str, ...] = ()):
    for key, value in values.items():
        path = (*prefix, key)
        yield path
        if isinstance(value, dict):
            yield from all_key_paths(value, path)


def test_schema_describes_every_values_key():
    values, schema = load_chart()
    missing = [".".join(p) for p in all_key_paths(values) if schema_node(schema, list(p)) is None]
    assert not missing, f"values.yaml keys absent from values.schema.json: {missing}"
    # Each key the user sets has its own description (map entries such as resources.requests.cpu inherit
    # the map's).
    undescribed = [
        ".".join(p)
        for p in all_key_paths(values)
        if not (schema_node(schema, list(p)) or {}).get("description")
        and not (schema_node(schema, list(p[:-1])) or {}).get("additionalProperties")
    ]
    assert not undescribed, f"schema properties without a description: {undescribed}"


def test_schema_has_no_key_missing_from_values():
    """The other direction: no schema property that values.yaml lacks (a stale or undocumented key). An empty
    map in values.yaml (e.g. `resources: {}`) leaves its optional properties unset on purpose."""
    values, schema = load_chart()

    def walk(path: list[str], value) -> None:
        if not isinstance(value, dict) or not value:
            return
        for key in (schema_node(schema, path) or {}).get("properties", {}):
            assert key in value, f"schema property {'.'.join([*path, key])} is not in values.yaml"
        for key, sub in value.items():
            walk([*path, key], sub)

    walk([], values)


def test_defaults_and_option_files_validate_against_the_schema():
    values, schema = load_chart()
    validator = jsonschema.Draft7Validator(schema)
    assert not list(validator.iter_errors(values))
    for path in CI_VALUES:
        merged = deep_merge(copy.deepcopy(values), yaml.safe_load(path.read_text()))
        errors = [e.message for e in validator.iter_errors(merged)]
        assert not errors, f"{path.name}: {errors}"


def test_schema_rejects_a_mistyped_key(helm):
    done = run([helm, "template", "demo", str(CHART), "--set", "server.drainTimeoutSecond=5"])
    assert done.returncode != 0
    assert "drainTimeoutSecond" in done.stderr and "not allowed" in done.stderr


def test_readme_table_has_a_row_for_every_key():
    values, _ = load_chart()
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    keys = {".".join(p) for p in leaf_paths(values)}
    assert keys - rows == set(), f"values without a README row: {sorted(keys - rows)}"
    assert rows - keys == set(), f"README rows for keys values.yaml lacks: {sorted(rows - keys)}"


def test_readme_table_is_current():
    values, schema = load_chart()
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    assert render_table(values, schema) in readme, "stale table: run `python deploy/chart_readme.py`"


def test_lint_default_and_every_option(helm):
    for extra in [[]] + [["-f", str(p)] for p in CI_VALUES]:
        done = run([helm, "lint", "--strict", str(CHART), *extra])
        assert done.returncode == 0, f"helm lint {extra}: {done.stdout}{done.stderr}"


def test_every_rendering_passes_kubernetes_validate(rendered, kubernetes_validate):
    assert {"default"} | OPTIONS == set(rendered)
    for name, out in rendered.items():
        done = run([kubernetes_validate, "--strict", "--quiet", "-"], stdin=out.text)
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
        # Each object was checked against a Kubernetes schema, except the CRDs tested below by hand.
        kinds = {o["kind"] for o in out.objects}
        unchecked = {k for k in kinds if k in ("ServiceMonitor", "ScaledObject")}
        warned = set(re.findall(r"schema for kind (\w+)", done.stdout + done.stderr))
        assert warned == unchecked, f"{name}: kinds without a schema {warned}"


def test_renderings_also_valid_on_the_oldest_supported_kubernetes(rendered, kubernetes_validate):
    """Chart.yaml's kubeVersion floor: the API versions used (autoscaling/v2, policy/v1, Indexed Jobs) exist
    there with the same fields."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    floor = re.match(r">=\s*(\d+\.\d+)", chart["kubeVersion"]).group(1) + ".0"
    stream = "\n---\n".join(out.text for out in rendered.values())
    done = run([kubernetes_validate, "-k", floor, "--strict", "--quiet", "-"], stdin=stream)
    assert done.returncode == 0, f"kubernetes {floor}: {done.stdout}{done.stderr}"


def test_a_broken_manifest_fails_the_same_check(rendered, kubernetes_validate):
    deployment = copy.deepcopy(rendered["default"].one("Deployment"))
    # A misspelt field (strict mode) and a string where Kubernetes wants an integer.
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    broken_strict = yaml.safe_dump(deployment)
    deployment = copy.deepcopy(rendered["default"].one("Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "forty"
    broken_type = yaml.safe_dump(deployment)
    for text, needle in ((broken_strict, "periodSecond"), (broken_type, "forty")):
        done = run(
            [kubernetes_validate, "--strict", "--quiet", "-"], stdin=rendered["default"].text + "---\n" + text
        )
        assert done.returncode != 0, f"kubernetes-validate accepted a manifest with {needle!r}"
        assert needle in done.stdout + done.stderr


def server_pod(out: Rendered) -> dict:
    return out.one("Deployment")["spec"]["template"]["spec"]


def env_of(out: Rendered) -> dict[str, str]:
    """The ConfigMap read with envFrom (the settings file, when there is one, has its own)."""
    (env,) = [c for c in out.of_kind("ConfigMap") if not c["metadata"]["name"].endswith("-settings")]
    return env["data"]


@pytest.mark.parametrize("name", ["default", *sorted(OPTIONS)])
def test_server_pod_probes_drain_security_and_scratch(rendered, name):
    out = rendered[name]
    pod = server_pod(out)
    (server,) = [c for c in pod["containers"] if c["name"] == "server"]
    port = server["ports"][0]
    assert port["name"] == "http"
    probes = {kind: server[f"{kind}Probe"]["httpGet"] for kind in ("startup", "readiness", "liveness")}
    assert probes == {
        "startup": {"path": "/health", "port": "http"},
        "readiness": {"path": "/health/ready", "port": "http"},
        "liveness": {"path": "/health/live", "port": "http"},
    }
    # The startup window covers loading the model; liveness only begins after it.
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60

    # preStop pause, then the drain: the grace period must cover both, or the kubelet kills live streams.
    sleep = server["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain = int(env_of(out)["INSTRUCTLM_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + drain

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] > 0
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
    assert pod["automountServiceAccountToken"] is False

    # Every path the server writes under the read-only root is an emptyDir mount.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    env = env_of(out)
    for path in ("/tmp", env["XDG_CACHE_HOME"]):
        assert path in mounts, f"{name}: {path} is not mounted"
        assert "emptyDir" in volumes[mounts[path]], f"{name}: {path} is not an emptyDir"
        assert volumes[mounts[path]]["emptyDir"].get("sizeLimit"), f"{name}: {path} has no size limit"

    # Rolling updates never go below the serving capacity: a new pod is ready before an old one drains.
    assert out.one("Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_long_drain_option_keeps_its_explicit_grace_period(rendered):
    pod = server_pod(rendered["long-drain"])
    assert pod["terminationGracePeriodSeconds"] == 150
    assert env_of(rendered["long-drain"])["INSTRUCTLM_DRAIN_TIMEOUT_S"] == "120"
    # The default is derived: 10 s pause + 30 s drain + 5 s to exit.
    assert server_pod(rendered["default"])["terminationGracePeriodSeconds"] == 45


def test_grace_period_shorter_than_pause_plus_drain_fails_the_render(helm):
    done = run([helm, "template", "demo", str(CHART), "--set", "server.terminationGracePeriodSeconds=30"])
    assert done.returncode != 0
    assert "server.terminationGracePeriodSeconds=30" in done.stderr and "= 40" in done.stderr


def test_model_sources(rendered, helm):
    default = server_pod(rendered["default"])
    assert "model" not in {v["name"] for v in default["volumes"]}
    assert env_of(rendered["default"])["INSTRUCTLM_MODEL"] == "/models/bundle"

    pvc = server_pod(rendered["model-pvc"])
    (volume,) = [v for v in pvc["volumes"] if v["name"] == "model"]
    assert volume["persistentVolumeClaim"] == {"claimName": "instructlm-models", "readOnly": True}
    (mount,) = [m for m in pvc["containers"][0]["volumeMounts"] if m["name"] == "model"]
    assert mount == {
        "name": "model",
        "mountPath": "/models/bundle",
        "subPath": "demo/bundle",
        "readOnly": True,
    }

    init = server_pod(rendered["model-init-container"])
    (fetch,) = init["initContainers"]
    assert fetch["image"] == "registry.example.com/instructlm-model-demo:2026-11-28"
    assert fetch["command"] == ["cp", "-R", "/models/bundle/.", "/models/bundle/"]
    (volume,) = [v for v in init["volumes"] if v["name"] == "model"]
    assert volume["emptyDir"]["sizeLimit"] == "2Gi"

    done = run([helm, "template", "demo", str(CHART), "--set", "model.source=pvc"])
    assert done.returncode != 0 and "model.pvc.claimName" in done.stderr


def test_api_keys_come_from_a_secret(rendered, helm):
    out = rendered["api-keys"]
    secret = out.one("Secret")
    assert secret["stringData"] == {"api-keys": "sk-test-0123456789abcdef"}
    (server,) = server_pod(out)["containers"]
    by_name = {e["name"]: e for e in server["env"]}
    assert by_name["INSTRUCTLM_API_KEYS"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "api-keys",
    }
    assert by_name["TZ"] == {"name": "TZ", "value": "UTC"}
    assert env_of(out)["INSTRUCTLM_MAX_NUM_SEQS"] == "16"
    # The key never lands in the ConfigMap.
    assert "sk-test" not in yaml.safe_dump(out.of_kind("ConfigMap"))

    existing = rendered["api-keys-existing-secret"]
    assert existing.of_kind("Secret") == []
    (server,) = server_pod(existing)["containers"]
    assert server["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "instructlm-keys"

    done = run([helm, "template", "demo", str(CHART), "--set", "apiKeys.enabled=true"])
    assert done.returncode != 0 and "apiKeys.existingSecret" in done.stderr


def test_config_change_rolls_the_pods(helm):
    before = render(helm).one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = render(helm, "--set", "server.logLevel=debug")
    assert after.one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != before


def test_autoscaling_on_waiting_requests(rendered):
    assert rendered["default"].of_kind("HorizontalPodAutoscaler") == []
    out = rendered["autoscaling-prometheus-adapter"]
    hpa = out.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == out.one("Deployment")["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "instructlm_num_requests_waiting"
    assert metrics["Pods"]["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    # The HPA owns the replica count.
    assert "replicas" not in out.one("Deployment")["spec"]

    keda = rendered["autoscaling-keda"]
    assert keda.of_kind("HorizontalPodAutoscaler") == [], "KEDA makes its own HPA; two would fight"
    scaled = keda.one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == keda.one("Deployment")["metadata"]["name"]
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    assert triggers["cpu"]["metadata"]["value"] == "70"
    prom = triggers["prometheus"]["metadata"]
    assert (
        prom["query"].startswith("sum(instructlm_num_requests_waiting{")
        and 'namespace="llm"' in prom["query"]
    )
    assert prom["threshold"] == "2" and prom["serverAddress"].startswith("http")


def test_service_monitor_scrapes_the_service_port(rendered):
    assert rendered["default"].of_kind("ServiceMonitor") == []
    out = rendered["service-monitor"]
    monitor, service = out.one("ServiceMonitor"), out.one("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
    annotations = out.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.io/scrape" not in annotations
    default = rendered["default"].one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert default["prometheus.io/scrape"] == "true" and default["prometheus.io/path"] == "/metrics"


def test_service_and_pdb_select_the_server_pods(rendered):
    out = rendered["default"]
    labels = out.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert out.one("Service")["spec"]["selector"].items() <= labels.items()
    assert out.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert out.one("Service")["spec"]["ports"][0]["targetPort"] == "http"


def test_training_job_runs_torchrun(rendered):
    assert rendered["default"].of_kind("Job") == []
    single = rendered["training-single-node"].one("Job")
    pod = single["spec"]["template"]["spec"]
    (trainer,) = pod["containers"]
    command = trainer["command"]
    assert command[0] == "torchrun" and "--standalone" in command and "--nproc-per-node=4" in command
    assert command[command.index("--no-python") + 1 :] == [
        "instructlm",
        "train",
        "--config",
        "configs/train/small.toml",
    ]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert trainer["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m["name"] for m in trainer["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/app/runs"]]["persistentVolumeClaim"]["claimName"] == "instructlm-runs"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]]

    multi = rendered["training-multi-node"]
    job = multi.one("Job")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    (headless,) = [s for s in multi.of_kind("Service") if s["spec"].get("clusterIP") == "None"]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    name = job["metadata"]["name"]
    assert f"--rdzv-endpoint={name}-0.{headless['metadata']['name']}:29500" in command
    assert job["spec"]["template"]["spec"]["subdomain"] == headless["metadata"]["name"]
    assert headless["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_training_without_a_claim_is_refused(helm):
    done = run([helm, "template", "demo", str(CHART), "--set", "training.enabled=true"])
    assert done.returncode != 0 and "training.runsClaimName" in done.stderr


def deep_merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


@pytest.mark.parametrize("name", ["default", "api-keys", "long-drain", "settings-file"])
def test_configmap_settings_are_the_service_settings(rendered, name):
    """Every INSTRUCTLM_* variable the chart sets is a field of service.settings.Settings (the service ignores
    unknown names, so a rename there would silently drop a setting here), and the values load."""
    from service.settings import Settings, from_env, load_settings

    out = rendered[name]
    # INSTRUCTLM_SETTINGS names the settings file (tested below), the rest are fields.
    env = {k: v for k, v in env_of(out).items() if k.startswith("INSTRUCTLM_") and k != "INSTRUCTLM_SETTINGS"}
    (server,) = [c for c in server_pod(out)["containers"] if c["name"] == "server"]
    for entry in server.get("env", []):
        if entry["name"].startswith("INSTRUCTLM_"):
            env[entry["name"]] = entry.get("value", "sk-from-a-secret-0123456789")
    fields = {f.encode_name for f in msgspec.inspect.type_info(Settings).fields}
    unknown = sorted(k for k in env if k.removeprefix("INSTRUCTLM_").lower() not in fields)
    assert not unknown, f"chart sets variables the service ignores: {unknown}"
    assert set(from_env(env)) == {k.removeprefix("INSTRUCTLM_").lower() for k in env}
    settings = load_settings(environ=env)
    assert settings.model == env["INSTRUCTLM_MODEL"]
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.drain_timeout_s == float(env["INSTRUCTLM_DRAIN_TIMEOUT_S"])
    if "INSTRUCTLM_API_KEYS" in env:
        assert settings.api_keys == ["sk-from-a-secret-0123456789"]


def test_settings_file_is_mounted_and_loads(rendered, tmp_path):
    """server.settingsToml: a ConfigMap file at the path INSTRUCTLM_SETTINGS names, which the service loads with
    the environment on top; the user's knowledge-base volume is mounted where the file says."""
    from service.settings import load_settings

    out = rendered["settings-file"]
    env = env_of(out)
    (files,) = [c for c in out.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-settings")]
    pod = server_pod(out)
    (server,) = pod["containers"]
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["settings"]["configMap"]["name"] == files["metadata"]["name"]
    assert env["INSTRUCTLM_SETTINGS"] == mounts["settings"]["mountPath"] + "/serve.toml"
    assert mounts["knowledge-base"]["mountPath"] == "/etc/instructlm-kb"
    assert volumes["knowledge-base"]["configMap"]["name"] == "kestrel-faq"

    path = tmp_path / "serve.toml"
    path.write_text(files["data"]["serve.toml"])
    environ = {k: v for k, v in env.items() if k.startswith("INSTRUCTLM_") and k != "INSTRUCTLM_SETTINGS"}
    settings = load_settings(path, environ=environ)
    assert settings.max_num_seqs == 8 and settings.max_waiting == 32
    assert settings.tasks.customer_service.knowledge_base == "/etc/instructlm-kb/faq.jsonl"
    assert settings.tasks.customer_service.top_k == 5
    assert settings.model == env["INSTRUCTLM_MODEL"]
    assert "settings" not in {v["name"] for v in server_pod(rendered["default"])["volumes"]}


def test_training_config_exists_and_writes_onto_the_claim():
    """The Job runs in /app with the claim at /app/runs: the default recipe must ship with the image (configs/)
    and write its outputs and read its dataset under runs/, or a restarted pod would lose them."""
    import tomllib

    values, _ = load_chart()
    recipe = tomllib.loads((ROOT / values["training"]["config"]).read_text(encoding="utf-8"))
    assert values["training"]["config"].startswith("configs/")
    assert recipe["out_dir"].startswith("runs/")
    assert recipe["data"]["dataset"].startswith("runs/") and recipe["data"]["tokenizer"].startswith("runs/")
