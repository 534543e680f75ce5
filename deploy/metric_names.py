"""The Prometheus series that the deployment reads: the Grafana dashboard's queries, the chart's autoscaling
(HPA Pods metric, KEDA query), the prometheus-adapter rule and the alerting rules. Tests check each against the service's registry; the image test against a live
/metrics scrape.

    python deploy/metric_names.py   # one name a line
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "instructlm-dashboard.json"
TEMPLATES = ROOT / "helm" / "instructlm" / "templates"
PROMETHEUS = ROOT / "deploy" / "prometheus"
_NAME = re.compile(r"\binstructlm_[a-z0-9_]+\b")


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    dash = json.loads(path.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash.get("templating", {}).get("list", []) if v.get("definition")]
    return exprs


def referenced_metrics() -> list[str]:
    names = set()
    for expr in dashboard_queries():
        names.update(_NAME.findall(expr))
    for path in (
        TEMPLATES / "hpa.yaml",
        TEMPLATES / "keda-scaledobject.yaml",
        *sorted(PROMETHEUS.glob("*.yaml")),
    ):
        names.update(_NAME.findall(path.read_text(encoding="utf-8")))
    return sorted(names)


if __name__ == "__main__":
    print("\n".join(referenced_metrics()))
