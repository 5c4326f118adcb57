"""Evaluation: routing accuracy, task scores routed / oracle / base, reports, the demo.

- `runs`         row routing, task scores, the eval driver,
                 router-only report
- `task_metrics` exact match (generation) and multiple-choice log-likelihood with per-row adapters
- `token_eval`   task scores with adapters mixed (`ariadne eval --routing token`)
- `reports`      report folders (markdown, JSON, confusion, margin and ood-score plots)
- `demo`         `ariadne demo`

The eval functions of `runs` and `routing.report.routing_report` are exported here (`from ariadne_hf.evaluation import router_only_report`).
"""

from ..routing.report import routing_report
from .runs import evaluate_bundle, read_records, route_rows, router_only_report, task_scores

__all__ = ["evaluate_bundle", "read_records", "route_rows", "router_only_report", "routing_report", "task_scores"]
