"""cluster/k8s/ against KubeRay's CRD schemas (tests/data/kuberay/, v1.7.0) the way the API server
checks them, and against what the repository pins: the image cluster/Dockerfile builds, Ray's
version, the install line of every node, the preset the job runs."""
from __future__ import annotations

import argparse
import copy
import functools
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "cluster" / "k8s"
CRDS = REPO / "tests" / "data" / "kuberay"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # the CRDs are 2.3 MB: libyaml when present


def load(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d]


def api_server_view(s: dict) -> dict:
    """A CRD's OpenAPI schema for jsonschema, as the API server applies it: int-or-string made
    explicit, and unknown fields rejected (structural schemas prune them; `kubectl apply`'s
    strict field validation refuses them) unless a node preserves them."""
    s = dict(s)
    if "properties" in s:
        s["properties"] = {k: api_server_view(v) for k, v in s["properties"].items()}
        if not s.get("x-kubernetes-preserve-unknown-fields"):
            s.setdefault("additionalProperties", False)
    for k in ("items", "additionalProperties", "not"):
        if isinstance(s.get(k), dict):
            s[k] = api_server_view(s[k])
    for k in ("anyOf", "allOf", "oneOf"):
        if k in s:
            s[k] = [api_server_view(x) for x in s[k]]
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return s


@functools.cache
def crd(kind: str) -> tuple[str, jsonschema.protocols.Validator]:
    """(apiVersion, validator) of KubeRay's CRD for ``kind``, version v1."""
    (doc,) = load(CRDS / f"ray.io_{kind.lower()}s.yaml")
    assert doc["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    schema = api_server_view(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return f"{doc['spec']['group']}/v1", jsonschema.Draft4Validator(schema)


def errors(doc: dict) -> list[str]:
    api_version, validator = crd(doc["kind"])
    found = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    if doc.get("apiVersion") != api_version:
        found.append(f"apiVersion {doc.get('apiVersion')!r}, expected {api_version}")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", doc.get("metadata", {}).get("name", "")):
        found.append(f"metadata.name {doc.get('metadata', {}).get('name')!r} is not a DNS-1123 label")
    return found


@functools.cache
def manifests() -> dict[str, dict]:
    """kind -> the document; `kubectl apply -f cluster/k8s/` applies exactly these."""
    docs = [d for p in sorted(K8S.glob("*.y*ml")) for d in load(p)]
    by_kind = {d["kind"]: d for d in docs}
    assert sorted(by_kind) == ["RayCluster", "RayJob"] and len(docs) == 2, [d["kind"] for d in docs]
    return by_kind


def cluster() -> dict:
    return manifests()["RayCluster"]


def job() -> dict:
    return manifests()["RayJob"]


def pod_specs() -> list[dict]:
    spec = cluster()["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def containers() -> list[dict]:
    return [c for p in pod_specs() for c in p["containers"]]


def quantity(q) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(q))
    assert m, q
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


def entrypoint() -> tuple[str, list[str]]:
    """(config path in the image, --set overrides) of the RayJob's `python -m trainer.pretrain`."""
    argv = shlex.split(job()["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "trainer.pretrain"], argv
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv[3:])
    return a.config, a.overrides


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of cluster/Dockerfile, comments and continuations folded."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def in_image(path: str) -> Path | None:
    """The repository file a Dockerfile COPY puts at ``path`` in the image, or None."""
    for i, a in dockerfile():
        src, dst = a.split() if i == "COPY" else ("", "")
        if dst and (path + "/").startswith(dst.rstrip("/") + "/"):
            return REPO / src / path[len(dst.rstrip("/")):].lstrip("/")
    return None


def image_tag() -> str:
    labels = dict(re.findall(r'([\w.]+)="([^"]*)"', " ".join(a for i, a in dockerfile() if i == "LABEL")))
    return f"{labels['org.opencontainers.image.title']}:{labels['org.opencontainers.image.version']}"


def ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", d.replace(" ", "")) for d in deps if re.match(r"ray\W", d)]
    return pin.group(2)


# ------------------------------------------------------------------------------ schemas
@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_manifest_is_valid_for_kuberay(kind):
    assert errors(manifests()[kind]) == []


def _unknown_top(d):
    d["spec"]["rayStartParms"] = {}


def _unknown_deep(d):
    d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"


def _replicas_two(d):
    d["spec"]["workerGroupSpecs"][0]["replicas"] = "two"


def _no_template(d):
    del d["spec"]["headGroupSpec"]["template"]


def _no_container_name(d):
    del d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]


def _cpu_not_a_quantity(d):
    d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [8]


def _job_unknown(d):
    d["spec"]["clusterSelecter"] = d["spec"].pop("clusterSelector")


def _job_wrong_type(d):
    d["spec"]["entrypointNumCpus"] = "one"


def _bad_api_version(d):
    d["apiVersion"] = "ray.io/v1alpha2"


def _bad_name(d):
    d["metadata"]["name"] = "T3D_cluster"


@pytest.mark.parametrize("kind, mutate", [
    ("RayCluster", _unknown_top), ("RayCluster", _unknown_deep), ("RayCluster", _replicas_two),
    ("RayCluster", _no_template), ("RayCluster", _no_container_name), ("RayCluster", _cpu_not_a_quantity),
    ("RayCluster", _bad_api_version), ("RayJob", _job_unknown), ("RayJob", _job_wrong_type),
    ("RayJob", _bad_name)], ids=lambda x: x if isinstance(x, str) else x.__name__.strip("_"))
def test_broken_copies_are_rejected(kind, mutate):
    broken = copy.deepcopy(manifests()[kind])
    mutate(broken)
    assert errors(broken), f"{mutate.__name__} was accepted"


def test_quantities_take_integers_and_strings():
    d = copy.deepcopy(cluster())
    head = d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"]["limits"] = {"cpu": 8, "memory": "32Gi"}
    assert errors(d) == []


# ------------------------------------------------------------------------------ what the manifests say
def test_secrets_are_referenced_never_written():
    example = {d["metadata"]["name"]: d for d in load(K8S / "secrets.yaml.example")}
    auth = cluster()["spec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"] in example
    assert set(example[auth["secretName"]]["stringData"]) == {"auth_token"}   # the key KubeRay reads
    s3 = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"}
    for c in containers():
        refs = {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
        assert [n for n in refs if set(example[n]["stringData"]) == s3], c["name"]
        secret_names = r"AWS_|RAY_AUTH_TOKEN|MLFLOW_TRACKING_(USERNAME|PASSWORD|TOKEN)"
        assert not [e for e in c.get("env", []) if "value" in e and re.match(secret_names, e["name"])], c["name"]
    text = "".join(p.read_text() for p in K8S.glob("*.yaml"))
    assert not re.search(r"AKIA[0-9A-Z]{16}|\b[0-9a-f]{64}\b|PLACEHOLDER|kind:\s*Secret", text)
    for d in example.values():
        for k, v in d["stringData"].items():
            assert "PLACEHOLDER" in v or k in ("AWS_ENDPOINT_URL", "AWS_REGION"), (k, v)


def test_dashboard_is_reachable_from_the_submitter_pod():
    params = cluster()["spec"]["headGroupSpec"]["rayStartParams"]
    assert params.get("dashboard-host", "0.0.0.0") not in ("127.0.0.1", "localhost")
    spec = job()["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster()["metadata"]["name"]}
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"   # through the head Service


def test_gpu_workers_fit_the_preset():
    from common.config import load_config

    config, overrides = entrypoint()
    cfg = load_config(in_image(config), overrides)
    gpus = cpus = 0.0
    for g in cluster()["spec"]["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        limits, requests = c["resources"]["limits"], c["resources"].get("requests", {})
        assert quantity(limits["nvidia.com/gpu"]) > 0, g["groupName"]
        assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
        gpus += g["replicas"] * quantity(limits["nvidia.com/gpu"])
        cpus += g["replicas"] * quantity(limits["cpu"])
    assert cfg.ray.use_gpu and gpus >= cfg.ray.num_workers + cfg.eval.gpus
    assert cpus >= (cfg.ray.num_workers * cfg.ray.cpus_per_worker + cfg.data.loader_actors
                    * cfg.data.loader_cpus_per_actor + cfg.eval.cpus)


def test_object_store_fits_shared_memory():
    spec = cluster()["spec"]
    for group, pod in zip([spec["headGroupSpec"]] + spec["workerGroupSpecs"], pod_specs()):
        (shm,) = [v for v in pod["volumes"] if v["name"] in
                  {m["name"] for c in pod["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"}]
        assert shm["emptyDir"]["medium"] == "Memory"
        store = group["rayStartParams"]["object-store-memory"]
        assert int(store) < quantity(shm["emptyDir"]["sizeLimit"])


def test_data_and_runs_live_on_s3():
    sets = dict(o.split("=", 1) for o in entrypoint()[1])
    assert sets["data.shards"].startswith("s3://") and sets["train.output_dir"].startswith("s3://")
    for pod in pod_specs():
        assert not [v for v in pod.get("volumes", []) if "persistentVolumeClaim" in v or "hostPath" in v]


def test_job_tracks_to_mlflow():
    env = yaml.safe_load(job()["spec"]["runtimeEnvYAML"])["env_vars"]
    assert re.fullmatch(r"https?://[^/\s]+(/\S*)?", env["MLFLOW_TRACKING_URI"]), env


def test_job_config_and_text_encoder_are_in_the_image():
    from common.config import load_config

    config, overrides = entrypoint()
    assert in_image(config) and in_image(config).is_file(), config
    cfg = load_config(in_image(config), overrides)                   # every --set key exists and types
    assert cfg.model.text_encoder and in_image(cfg.model.text_encoder), cfg.model.text_encoder


# ------------------------------------------------------------------------------ image and versions
def test_manifests_name_the_dockerfile_tag():
    tag = image_tag()
    assert tag.split(":")[1] == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = [c["image"] for c in containers()]
    sub = job()["spec"].get("submitterPodTemplate")
    images += [c["image"] for c in sub["spec"]["containers"]] if sub else []
    assert images and all(i == tag or i.endswith("/" + tag) for i in images), (tag, images)


def test_ray_version_is_the_pinned_one_everywhere():
    ray = ray_pin()
    assert cluster()["spec"]["rayVersion"] == ray
    ((_, base),) = [(i, a) for i, a in dockerfile() if i == "FROM"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"   # the env constraints.txt is frozen from
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray)}-{py}-cu\d+", base), f"{base}: not Ray {ray}, {py}"


def test_dockerfile_installs_with_the_nodes_install_line():
    steps = dockerfile()
    for step in [("COPY", "dist/ /opt/t3d/dist/"), ("COPY", "cluster/node.sh /opt/t3d/node.sh"),
                 ("RUN", "bash /opt/t3d/node.sh install /opt/t3d/dist")]:
        assert step in steps, step
    assert not [a for i, a in steps if i == "RUN" and "pip" in a]
    env = dict(a.split("=", 1) for i, a in steps if i == "ENV")
    assert env["PATH"].startswith(env["T3D_VENV"] + "/bin:")     # `ray start` finds node.sh's venv
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    for i, a in steps:
        if i == "COPY":
            assert "!" + a.split()[0] in ignore, a                # in the build context
    node_sh = REPO / "cluster" / "node.sh"
    if not node_sh.is_file():
        pytest.skip("cluster/node.sh is not written yet: its calls from the launcher configs are unchecked")
    for cfg in sorted((REPO / "cluster").glob("*.yaml")):
        if "setup_commands" in cfg.read_text():
            assert re.search(r"node\.sh install", cfg.read_text()), f"{cfg.name} does not install with node.sh"
