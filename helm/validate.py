"""Lint, render and validate the palstream Helm chart offline.

For every value set ``helm/values-*.yaml`` this runs ``helm lint --strict`` and ``helm
template`` through helm-python-sdk (Helm's Go SDK as a shared library, no ``helm`` binary),
then validates every rendered manifest: core kinds with kubernetes-validate (strict schemas,
unknown fields rejected), the dask-kubernetes operator and Prometheus Operator kinds with the
JSON schemas vendored in ``helm/schemas/`` (see its README for their sources). Values files
and Chart.yaml go through yamllint, and the chart's copy of the Grafana dashboard must equal
the one in ``monitoring/``.

Usage::

    python helm/validate.py            # exit status 0 when everything passes
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import referencing
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, schema_contents
from yamllint import config as yamllint_config
from yamllint import linter as yamllint_linter

HELM_DIR = Path(__file__).resolve().parent
REPO = HELM_DIR.parent
CHART = HELM_DIR / "palstream"
SCHEMAS = HELM_DIR / "schemas"
VALUE_SETS = sorted(HELM_DIR.glob("values-*.yaml"))
# The chart's dashboard copy (Helm reads files only inside the chart) and its original.
DASHBOARD_COPY = CHART / "dashboards" / "palstream.json"
DASHBOARD_SOURCE = REPO / "monitoring" / "grafana-dashboard.json"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion); schemas of that release.
KUBE_VERSION = "1.27.0"
RELEASE = "palstream-ci"
NAMESPACE = "media"
# Kinds validated against helm/schemas/ instead of kubernetes-validate: (apiVersion, kind) -> file.
CUSTOM_KINDS = {
    ("kubernetes.dask.org/v1", "DaskJob"): "daskjob-kubernetes.dask.org-v1.json",
    ("kubernetes.dask.org/v1", "DaskCluster"): "daskcluster-kubernetes.dask.org-v1.json",
    ("kubernetes.dask.org/v1", "DaskWorkerGroup"): "daskworkergroup-kubernetes.dask.org-v1.json",
    ("kubernetes.dask.org/v1", "DaskAutoscaler"): "daskautoscaler-kubernetes.dask.org-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
}
YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: {max: 120}
  document-start: disable
  comments: {min-spaces-from-content: 1}
"""


class ChartError(Exception):
    """The chart fails lint, rendering or validation; the message says where."""


def load_values(path: Path) -> dict:
    """Parse a values file the way ``helm -f`` does."""
    return helm.values_from_yaml(path.read_text())


def lint(values: dict | None) -> list[str]:
    """``helm lint --strict`` of the chart with ``values``; returns the findings (empty: clean)."""
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    # Severity 1 is "info" (e.g. "icon is recommended"); warnings and errors fail under --strict.
    findings = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return findings + list(report["errors"])


def render(values: dict | None, name: str = RELEASE) -> list[dict]:
    """``helm template`` with ``values``: every rendered manifest, in template order.

    Raises
    ------
    ChartError
        Rendering failed: a ``fail`` in the templates or a values.schema.json violation.
    """
    try:
        with helm.Chart.load(CHART) as chart:
            rendered = chart.render(values=values, name=name, namespace=NAMESPACE, is_install=True)
    except helm.HelmError as exc:
        raise ChartError(str(exc).strip()) from None
    manifests = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                manifests.append(doc)
    return manifests


def render_notes(values: dict | None) -> str:
    """The rendered NOTES.txt for ``values``."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for template, text in rendered.items() if template.endswith("NOTES.txt"))


@functools.cache
def _registry() -> referencing.Registry:
    """Vendored schemas plus kubernetes-validate's strict core definitions they refer to."""
    core = schema_contents(_strict_dir() + "/_definitions.json", KUBE_VERSION)
    resources = [(core["$id"], referencing.Resource.from_contents(core))]
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], referencing.Resource.from_contents(schema)))
    return referencing.Registry().with_resources(resources)


def _strict_dir() -> str:
    return f"kubernetes-json-schema/v{KUBE_VERSION}-local-strict"



def validate_manifest(doc: dict) -> None:
    """Validate one manifest against its kind's schema.

    Raises
    ------
    ChartError
        The manifest does not validate or its kind has no schema here.
    """
    kind = (doc.get("apiVersion"), doc.get("kind"))
    where = f"{kind[1]}/{doc.get('metadata', {}).get('name')}"
    if kind in CUSTOM_KINDS:
        schema = json.loads((SCHEMAS / CUSTOM_KINDS[kind]).read_text())
        validator = jsonschema.Draft202012Validator(schema, registry=_registry())
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            first = errors[0]
            path = ".".join(str(p) for p in first.path)
            raise ChartError(f"{where}: {path}: {first.message}")
        return
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        raise ChartError(f"{where}: {path}: {exc.message}") from None
    except SchemaNotFoundError:
        raise ChartError(
            f"{where}: no schema for {kind[0]} {kind[1]}; vendor one into helm/schemas/ and list it in CUSTOM_KINDS"
        ) from None


def yamllint_paths(paths: list[Path]) -> list[str]:
    """yamllint findings (warnings and errors) for ``paths``."""
    conf = yamllint_config.YamlLintConfig(YAMLLINT_CONFIG)
    findings = []
    for path in paths:
        for problem in yamllint_linter.run(path.read_text(), conf, str(path)):
            findings.append(f"{path.relative_to(REPO)}:{problem.line}:{problem.column}: {problem.desc} ({problem.rule})")
    return findings


def dashboard_drift() -> str | None:
    """Why the chart's dashboard copy differs from monitoring/, or None when it matches."""
    if not DASHBOARD_SOURCE.is_file():
        return f"{DASHBOARD_SOURCE.relative_to(REPO)} does not exist"
    if not DASHBOARD_COPY.is_file() or DASHBOARD_COPY.read_bytes() != DASHBOARD_SOURCE.read_bytes():
        return (
            f"{DASHBOARD_COPY.relative_to(REPO)} differs from {DASHBOARD_SOURCE.relative_to(REPO)}; "
            f"copy it: cp {DASHBOARD_SOURCE.relative_to(REPO)} {DASHBOARD_COPY.relative_to(REPO)}"
        )
    return None


def main() -> int:
    """Run every check; print one line per value set and per problem. Returns the exit status."""
    helm.disable_logging()
    problems = yamllint_paths([CHART / "Chart.yaml", CHART / "values.yaml", *VALUE_SETS])
    drift = dashboard_drift()
    if drift:
        problems.append(drift)
    for values_file in VALUE_SETS:
        label = values_file.relative_to(REPO)
        values = load_values(values_file)
        findings = [f"{label}: helm lint: {f}" for f in lint(values)]
        try:
            manifests = render(values)
        except ChartError as exc:
            findings.append(f"{label}: helm template: {exc}")
            manifests = []
        for doc in manifests:
            try:
                validate_manifest(doc)
            except ChartError as exc:
                findings.append(f"{label}: {exc}")
        kinds = sorted({d["kind"] for d in manifests})
        status = "FAIL" if findings else "ok"
        print(f"{status} {label}: {len(manifests)} manifests ({', '.join(kinds)})")
        problems.extend(findings)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
