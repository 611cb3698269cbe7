"""The Helm chart, checked offline: lint, render and schema-validate every value set
(``helm/validate.py``), then assert on the rendered manifests what a deployment relies on."""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("helm_python", reason="pip install -e '.[test]' (helm-python-sdk)")
pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]' (kubernetes-validate)")

REPO = Path(__file__).resolve().parents[1]


def _load_validator():
    spec = importlib.util.spec_from_file_location("helm_validate", REPO / "helm" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.helm.disable_logging()
    return module


hv = _load_validator()
VALUE_SETS = {p.stem.removeprefix("values-"): p for p in hv.VALUE_SETS}


@functools.cache
def _rendered(name: str) -> tuple:
    return tuple(hv.render(hv.load_values(VALUE_SETS[name])))


def manifests(name: str) -> list[dict]:
    """Rendered manifests of value set ``name`` (a private copy, safe to modify)."""
    return copy.deepcopy(list(_rendered(name)))


def values(name: str) -> dict:
    return hv.load_values(VALUE_SETS[name])


def render_with(name: str, **overrides) -> list[dict]:
    """Render value set ``name`` with dotted-key overrides, e.g. ``**{"workers.gpu.gpus": 0}``."""
    merged = values(name)
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return hv.render(merged)


def pods(docs: list[dict]) -> dict[str, dict]:
    """Every pod template of a release by role: its metadata labels and pod spec."""
    found = {}
    for doc in docs:
        kind, spec = doc["kind"], doc.get("spec")
        if kind == "DaskJob":
            found["runner"] = spec["job"]
            found["scheduler"] = spec["cluster"]["spec"]["scheduler"]
            found["cpu-worker"] = spec["cluster"]["spec"]["worker"]
        elif kind == "DaskWorkerGroup":
            found["gpu-worker"] = spec["worker"]
        elif kind == "Job":
            found["runner"] = spec["template"]
        elif kind == "Deployment":
            role = doc["metadata"]["name"].removeprefix(hv.RELEASE + "-")
            found[role] = spec["template"]
    return found


def container(pod: dict) -> dict:
    (only,) = pod["spec"]["containers"]
    return only


# --- the chart passes offline validation -----------------------------------------------


def test_there_are_cpu_gpu_and_s3_value_sets():
    assert {"cpu", "gpu", "s3"} <= set(VALUE_SETS)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_value_set_lints_clean(name):
    assert hv.lint(values(name)) == []


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_manifest_validates(name):
    docs = manifests(name)
    assert docs
    for doc in docs:
        hv.validate_manifest(doc)


def test_operator_kinds_are_checked_against_vendored_schemas():
    kinds = {d["kind"] for name in VALUE_SETS for d in manifests(name)}
    assert {"DaskJob", "DaskWorkerGroup", "PodMonitor"} <= kinds
    for file in hv.CUSTOM_KINDS.values():
        assert (hv.SCHEMAS / file).is_file()


@pytest.mark.parametrize(
    ("kind", "mutate", "expected"),
    [
        ("DaskJob", lambda d: d["spec"]["job"]["spec"]["containers"][0].update(imagePullPolicyy="Always"), "imagePullPolicyy"),
        ("DaskJob", lambda d: d["spec"]["cluster"]["spec"]["scheduler"].pop("service"), "'service' is a required property"),
        ("DaskWorkerGroup", lambda d: d["spec"].pop("cluster"), "'cluster' is a required property"),
        ("PodMonitor", lambda d: d["spec"]["podMetricsEndpoints"][0].update(interval="15 seconds"), "does not match"),
        ("ConfigMap", lambda d: d.update(dataa={}), "dataa"),
    ],
)
def test_validator_rejects_broken_manifests(kind, mutate, expected):
    doc = next(d for d in manifests("gpu") if d["kind"] == kind)
    mutate(doc)
    with pytest.raises(hv.ChartError, match=re.escape(expected)):
        hv.validate_manifest(doc)


def test_values_files_pass_yamllint():
    paths = [hv.CHART / "Chart.yaml", hv.CHART / "values.yaml", *VALUE_SETS.values()]
    assert hv.yamllint_paths(paths) == []


def test_every_values_key_has_a_comment():
    """Each key of values.yaml sits right under a comment line; the insides of Kubernetes
    objects passed through verbatim (resources, node selectors, labels, list items) are
    documented by Kubernetes, not here."""
    verbatim = {"resources", "nodeSelector", "labels"}
    lines = (hv.CHART / "values.yaml").read_text().splitlines()
    root = yaml.compose("\n".join(lines))
    undocumented = []

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                line = key.start_mark.line
                if not lines[line - 1].strip().startswith("#"):
                    undocumented.append(".".join([*path, key.value]))
                if key.value not in verbatim:
                    walk(value, [*path, key.value])

    walk(root, [])
    assert undocumented == []


def test_chart_dashboard_is_the_monitoring_dashboard():
    assert hv.dashboard_drift() is None


def test_validate_script_passes():
    assert hv.main() == 0


# --- what the rendered manifests promise -------------------------------------------------


@pytest.mark.parametrize("name", ["gpu", "s3", "plain"])
def test_gpu_workers_request_one_gpu_and_run_dask_cuda_worker(name):
    worker = pods(manifests(name))["gpu-worker"]
    c = container(worker)
    assert c["command"][0] == "dask-cuda-worker"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert worker["spec"]["nodeSelector"] == values(name)["workers"].get("gpu", {}).get(
        "nodeSelector", {"nvidia.com/gpu.present": "true"}
    )
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["spec"]["tolerations"]


def test_gpu_worker_group_joins_the_jobs_cluster():
    docs = manifests("gpu")
    job = next(d for d in docs if d["kind"] == "DaskJob")
    group = next(d for d in docs if d["kind"] == "DaskWorkerGroup")
    assert group["spec"]["cluster"] == job["metadata"]["name"]
    assert group["spec"]["worker"]["replicas"] == values("gpu")["workers"]["gpu"]["replicas"]
    # GPU-only: the default (CPU) group of the cluster has no pods.
    assert job["spec"]["cluster"]["spec"]["worker"]["replicas"] == 0


def test_cluster_name_is_valid_for_the_operator_with_the_longest_release_name():
    release = "a" * 53  # Helm's limit on release names
    job = next(d for d in hv.render(values("gpu"), name=release) if d["kind"] == "DaskJob")
    # dask_kubernetes.constants.VALID_CLUSTER_NAME: "<name>-scheduler" must fit 63 characters.
    assert re.fullmatch(r"(?=.{,53}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_workers_get_the_malloc_settings_of_local_clusters(name):
    import dask.config

    from palstream.batch.cluster import WORKER_MALLOC

    worker = next(p for n, p in pods(manifests(name)).items() if n.endswith("-worker"))
    env = {e["name"]: e["value"] for e in container(worker)["env"] if "value" in e}
    # What the worker's Dask makes of the variable (environment over its defaults).
    parsed = dask.config.collect_env({"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": env["DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"]})
    merged = dask.config.merge(dask.config.config, parsed)
    assert {k: merged["distributed"]["nanny"]["pre-spawn-environ"][k] for k in WORKER_MALLOC} == WORKER_MALLOC


def test_cpu_only_has_no_gpu_workers():
    docs = manifests("cpu")
    assert not [d for d in docs if d["kind"] == "DaskWorkerGroup"]
    cpu = container(pods(docs)["cpu-worker"])
    assert cpu["command"][:2] == ["dask", "worker"]
    assert "nvidia.com/gpu" not in str(cpu["resources"])


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_runner_runs_palstream_submit_on_the_mounted_spec(name):
    docs = manifests(name)
    runner = pods(docs)["runner"]
    c = container(runner)
    assert c["command"][:3] == ["palstream", "submit", "/etc/palstream/job.toml"]
    # The job's cluster is the scheduler address Kubernetes substitutes from the environment.
    assert c["command"][c["command"].index("--cluster") + 1] == "$(DASK_SCHEDULER_ADDRESS)"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/palstream")
    volume = next(v for v in runner["spec"]["volumes"] if v["name"] == mount["name"])
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    assert configmap["data"]["job.toml"].strip() == values(name)["job"]["spec"].strip()


@pytest.mark.parametrize("name", ["cpu", "plain"])
def test_runner_command_is_accepted_by_the_palstream_cli(name):
    """The runner's arguments parse with the real `palstream submit` (without running it)."""
    cli = pytest.importorskip("palstream.cli")
    import typer.main

    command = container(pods(manifests(name))["runner"])["command"]
    assert command[:2] == ["palstream", "submit"]
    args = [a.replace("$(DASK_SCHEDULER_ADDRESS)", "tcp://scheduler:8786") for a in command[2:]]
    submit = typer.main.get_command(cli.app).commands["submit"]
    ctx = submit.make_context("submit", args)
    assert ctx.params["cluster"] == "tcp://scheduler:8786"
    assert ctx.params["metrics_port"] == hv.load_values(hv.CHART / "values.yaml")["job"]["metricsPort"]
    assert ctx.params["metrics_host"] == "0.0.0.0"


def test_scheduler_address_comes_from_the_operator_or_the_service():
    # Operator mode: the operator injects DASK_SCHEDULER_ADDRESS; the chart must not shadow it.
    runner = container(pods(manifests("cpu"))["runner"])
    assert "DASK_SCHEDULER_ADDRESS" not in {e["name"] for e in runner["env"]}
    # Plain mode: the chart points it at its own scheduler Service.
    docs = manifests("plain")
    service = next(d for d in docs if d["kind"] == "Service")
    env = {e["name"]: e.get("value") for e in container(pods(docs)["runner"])["env"]}
    assert env["DASK_SCHEDULER_ADDRESS"] == f"tcp://{service['metadata']['name']}.{hv.NAMESPACE}.svc.cluster.local:8786"
    scheduler_labels = pods(docs)["scheduler"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= scheduler_labels.items()


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_job_spec_in_value_sets_is_a_valid_palstream_job(name, tmp_path):
    spec_module = pytest.importorskip("palstream.batch.spec")
    path = tmp_path / "job.toml"
    path.write_text(values(name)["job"]["spec"])
    data = spec_module.load_job_file(path)
    data["cluster"] = "tcp://palstream-ci-scheduler.media.svc.cluster.local:8786"  # what --cluster sets
    job = spec_module.JobSpec.from_dict(data)
    mount = values(name)["storage"].get("mountPath", "/data")
    for url in (*job.inputs, job.output):
        assert url.startswith(("s3://", mount + "/")), f"{url} is neither on S3 nor on the mounted volume"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_metrics_ports_are_scraped(name):
    docs = manifests(name)
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    scraped = {e["port"]: e["path"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert scraped == {"http-dashboard": "/metrics", "metrics": "/metrics"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    roles = pods(docs)
    assert {"runner", "scheduler"} <= set(roles)
    for role, pod in roles.items():
        assert selector.items() <= pod["metadata"]["labels"].items(), f"{role} pods are not selected"
        ports = {p["name"] for p in container(pod)["ports"]}
        assert ports & set(scraped), f"{role} exposes no scraped port"
    runner = container(roles["runner"])
    port = next(p["containerPort"] for p in runner["ports"] if p["name"] == "metrics")
    command = runner["command"]
    assert command[command.index("--metrics-port") + 1] == str(port)
    assert command[command.index("--metrics-host") + 1] == "0.0.0.0"


def test_scrape_jobs_are_named_as_in_the_prometheus_config():
    """monitoring/alerts.yml selects on the job names of monitoring/prometheus.yml."""
    config = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
    static_jobs = {c["job_name"] for c in config["scrape_configs"]}
    monitor = next(d for d in manifests("cpu") if d["kind"] == "PodMonitor")
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        jobs = {
            r["regex"]: r["replacement"]
            for r in endpoint["relabelings"]
            if r["targetLabel"] == "job" and r["sourceLabels"] == ["__meta_kubernetes_pod_label_dask_org_component"]
        }
        assert jobs["job-runner"] == "palstream-driver" and jobs["worker"] == "palstream-workers"
        assert {"palstream-driver", "palstream-workers"} <= static_jobs


def test_s3_credentials_are_referenced_never_inlined():
    docs = manifests("s3")
    assert not [d for d in docs if d["kind"] == "Secret"]
    for role, pod in pods(docs).items():
        if role == "scheduler":
            continue  # the scheduler never touches storage
        env = {e["name"]: e for e in container(pod)["env"]}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[var], f"{role}: {var} is inlined"
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "palstream-s3"


def test_inlined_credentials_are_rejected_by_the_schema():
    with pytest.raises(hv.ChartError, match="additional properties 'secretAccessKey' not allowed"):
        render_with("s3", **{"storage.s3.secretAccessKey": "wJalrXUtnFEMI"})


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_containers_run_as_non_root_with_read_only_root_filesystem(name):
    for role, pod in pods(manifests(name)).items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, role
        assert spec["securityContext"]["runAsUser"] != 0, role
        assert spec["automountServiceAccountToken"] is False, role
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, role
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, role
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], role
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), f"{role} lacks resource requests"
            # The only writable paths are volumes: /tmp scratch and the data mount.
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, role


def test_storage_volumes():
    pvc = pods(manifests("cpu"))["cpu-worker"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": f"{hv.RELEASE}-data"}} in pvc
    assert any(d["kind"] == "PersistentVolumeClaim" for d in manifests("cpu"))
    host = pods(manifests("gpu"))["gpu-worker"]["spec"]["volumes"]
    assert {"name": "data", "hostPath": {"path": "/mnt/nvme/palstream", "type": "Directory"}} in host
    existing = manifests("plain")
    assert not any(d["kind"] == "PersistentVolumeClaim" for d in existing)
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "media-nvme"}} in pods(existing)["runner"]["spec"]["volumes"]


def test_plain_mode_needs_no_operator():
    docs = manifests("plain")
    assert not [d for d in docs if d["apiVersion"].startswith("kubernetes.dask.org/")]
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "Job"}
    assert set(pods(docs)) == {"runner", "scheduler", "cpu-worker", "gpu-worker"}


def test_grafana_dashboard_configmap_is_labelled_for_the_sidecar():
    cm = next(d for d in manifests("cpu") if d["metadata"]["name"].endswith("-dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["palstream.json"] == hv.DASHBOARD_COPY.read_text().rstrip("\n")


def test_notes_say_how_to_watch_and_scale():
    notes = hv.render_notes(values("gpu"))
    assert f"scale daskworkergroup {hv.RELEASE}-gpu" in notes
    assert "port-forward" in notes


# --- bad values fail rendering with a clear message ------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers.gpu.gpus": 0}, "workers.gpu.gpus is 0: GPU workers need exactly 1 GPU per pod"),
        ({"workers.gpu.gpus": 2}, "workers.gpu.gpus is 2: GPU workers need exactly 1 GPU per pod"),
        ({"workers.gpu.replicas": 0}, "workers.gpu.replicas is 0 with GPU workers enabled"),
        ({"storage.type": ""}, "storage.type is required: set it to s3, pvc or hostPath"),
        ({"storage.type": "nfs"}, "at '/storage/type': value must be one of"),
        ({"storage.type": "s3"}, "storage.s3.secretName is required for S3 storage"),
        ({"storage.hostPath.path": "nvme"}, "storage.hostPath.path must be an absolute path"),
        ({"job.spec": ""}, "job.spec is empty: pass the job TOML with --set-file job.spec="),
        ({"workers.gpu.enabled": False}, "no workers: set workers.cpu.replicas >= 1 or enable GPU workers"),
        ({"workers.gpu.replicass": 3}, "additional properties 'replicass' not allowed"),
        ({"workers.cpu.autoscale.enabled": True, "workers.cpu.autoscale.minimum": 9, "workers.cpu.autoscale.maximum": 4},
         "workers.cpu.autoscale.minimum (9) is above its maximum (4)"),
    ],
)
def test_bad_values_fail_with_a_clear_message(overrides, message):
    with pytest.raises(hv.ChartError, match=re.escape(message)):
        render_with("gpu", **overrides)


# --- container image recipe -------------------------------------------------------------


def test_dockerfile_builds_from_files_that_exist():
    text = (REPO / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(row for row in text.splitlines() if not row.lstrip().startswith("#")))
    instructions = [line.split(None, 1) for line in logical.splitlines() if line.strip()]
    base = next(arg for op, arg in instructions if op == "FROM")
    assert re.match(r"nvidia/cuda:[\d.]+-runtime-", base), base
    copied = [source for op, arg in instructions if op == "COPY" for source in arg.split()[:-1]]
    assert copied
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()}
    for source in copied:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert source not in ignored, f".dockerignore excludes {source}, which the Dockerfile copies"
    assert '"/src[gpu]"' in text
    user = next(arg for op, arg in instructions if op == "USER").strip()
    assert user == str(hv.load_values(hv.CHART / "values.yaml")["podSecurityContext"]["runAsUser"])


def test_cpu_workers_autoscale_with_the_backlog_through_the_operator():
    docs = manifests("s3")
    scaler = next(d for d in docs if d["kind"] == "DaskAutoscaler")
    job = next(d for d in docs if d["kind"] == "DaskJob")
    assert scaler["spec"] == {"cluster": job["metadata"]["name"], "minimum": 1, "maximum": 16}
    command = job["spec"]["job"]["spec"]["containers"][0]["command"]
    cpu = values("s3")["workers"]["cpu"]
    # The runner keeps enough tasks in flight for the scheduler to see the backlog it scales on.
    assert command[command.index("--max-in-flight") + 1] == str(16 * cpu.get("nthreads", 4))
    assert not any(d["kind"] == "DaskAutoscaler" for d in manifests("cpu"))
    with pytest.raises(hv.ChartError, match="workers.cpu.autoscale needs the dask-kubernetes operator"):
        render_with("plain", **{"workers.cpu.autoscale.enabled": True})
