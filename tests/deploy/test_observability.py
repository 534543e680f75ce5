"""Scraping and dashboards: every series the deployment reads (Grafana dashboard, HPA / KEDA, prometheus-adapter
rule, alerts) is one the service exposes, and every query is valid PromQL (promtool)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from deploy.metric_names import DASHBOARD, PROMETHEUS, dashboard_queries, referenced_metrics
from tests.deploy.conftest import find_tool, run


@pytest.fixture(scope="session")
def promtool() -> str:
    return find_tool("promtool")


def exposed_series() -> set[str]:
    """Sample names the service's registry can expose (a counter's `_total`, a histogram's `_bucket` ...)."""
    from service.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_every_referenced_series_is_exposed_by_the_service():
    referenced = referenced_metrics()
    # The three gauges routers and autoscalers read, and the latency histograms, at least.
    assert {
        "instructlm_num_requests_waiting",
        "instructlm_num_requests_running",
        "instructlm_kv_cache_usage_ratio",
    } <= set(referenced)
    assert "instructlm_time_to_first_token_seconds_bucket" in referenced
    missing = sorted(set(referenced) - exposed_series())
    assert not missing, f"the deployment reads series the service does not expose: {missing}"


def test_labels_used_in_queries_exist():
    """`sum by (finished_reason)` and `{reason=~...}` group on labels the counters really have."""
    from service.metrics import Metrics

    labels = {f.name: set() for f in Metrics().registry.collect()}
    for family in Metrics().registry.collect():
        for sample in family.samples:
            labels[family.name].update(sample.labels)
    assert "finished_reason" in labels["instructlm_request_success"]
    assert "reason" in labels["instructlm_request_failure"]
    queries = dashboard_queries() + [(PROMETHEUS / "alerts.yaml").read_text()]
    assert any("by (finished_reason)" in q for q in queries) and any("reason=~" in q for q in queries)


def dashboard_as_rules() -> dict:
    """Dashboard queries as recording rules, Grafana's variables replaced by what they expand to."""
    rules = []
    for i, expr in enumerate(dashboard_queries()):
        expr = expr.replace("$__rate_interval", "1m").replace("$namespace", ".*").replace("$pod", ".*")
        if expr.startswith("label_values("):  # a Grafana function: check its selector
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        rules.append({"record": f"instructlm:dashboard_query_{i}", "expr": expr})
    return {"groups": [{"name": "dashboard", "rules": rules}]}


def test_dashboard_queries_and_alerts_are_valid_promql(promtool, tmp_path):
    rules = tmp_path / "dashboard-rules.yaml"
    rules.write_text(yaml.safe_dump(dashboard_as_rules()))
    done = run([promtool, "check", "rules", str(rules), str(PROMETHEUS / "alerts.yaml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(dashboard_queries())} rules found" in done.stdout


def test_promtool_rejects_a_broken_query(promtool, tmp_path):
    broken = dashboard_as_rules()
    broken["groups"][0]["rules"][0]["expr"] = "sum(rate(instructlm_generation_tokens_total[1m])"
    rules = tmp_path / "broken.yaml"
    rules.write_text(yaml.safe_dump(broken))
    done = run([promtool, "check", "rules", str(rules)])
    assert done.returncode != 0
    assert "dashboard_query_0" in done.stdout + done.stderr or "unclosed" in done.stdout + done.stderr


def test_dashboard_layout():
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
    # Panels do not overlap.
    cells = set()
    for panel in dash["panels"]:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
    variables = {v["name"] for v in dash["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps([t["expr"] for p in dash["panels"] for t in p["targets"]])))
    assert used - {"__rate_interval"} <= variables


def test_adapter_rule_serves_the_hpa_metric(rendered):
    adapter = yaml.safe_load((PROMETHEUS / "adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    hpa = rendered["autoscaling-prometheus-adapter"].one("HorizontalPodAutoscaler")
    (pods,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert rule["name"]["as"] == pods["pods"]["metric"]["name"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
