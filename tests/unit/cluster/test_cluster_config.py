"""Static checks of the deployment files: cluster.yaml (Ray's own schema), cluster/Dockerfile, the KubeRay
manifests and cluster/runtime_env.yaml. Versions come from pyproject.toml, never from a second copy here."""

from __future__ import annotations

import copy
import re
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO_ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

CLUSTER_DIR = REPO_ROOT / "cluster"
KUBERAY_DIR = CLUSTER_DIR / "kuberay"
GPU_KEY = "nvidia.com/gpu"


# ----------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def ray_version(project) -> str:
    """The exact version pinned for ``ray[...]`` in pyproject.toml."""
    for dep in project["dependencies"]:
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([0-9][0-9.]*)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError("pyproject.toml pins no ray==X.Y.Z dependency")


@pytest.fixture(scope="module")
def cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())


def _base_image(ray_version: str) -> str:
    return f"rayproject/ray:{ray_version}-py311-gpu"


def _manifests() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(KUBERAY_DIR.glob("*.yaml"))}


def _ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    kind = doc["kind"]
    if kind == "RayCluster":
        return doc["spec"]
    if kind == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    if kind == "RayService":
        return doc["spec"]["rayClusterConfig"]
    raise AssertionError(f"not a Ray kind: {kind}")


def _ray_docs() -> dict[str, dict[str, Any]]:
    return {name: doc for name, doc in _manifests().items() if doc["apiVersion"].startswith("ray.io/")}


def _pod_specs(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return pods


# -------------------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_rays_schema_and_defaults(cluster_yaml):
    prepared = prepare_config(copy.deepcopy(cluster_yaml))  # what `ray up` does before any cloud call
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_rejects_a_misspelled_node_type_field(cluster_yaml):
    broken = copy.deepcopy(cluster_yaml)
    node = broken["available_node_types"]["worker.gpu.1xL4"]
    node["max_worker"] = node.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_node_types_and_autoscaling(cluster_yaml):
    types = cluster_yaml["available_node_types"]
    head = types[cluster_yaml["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs no tasks or actors
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items()}
    assert gpus == {"head.cpu": 0, "worker.cpu": 0, "worker.gpu.1xL4": 1, "worker.gpu.8xH100": 8}
    instance = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    assert instance["worker.gpu.1xL4"].startswith("g6.")
    assert instance["worker.gpu.8xH100"] == "p5.48xlarge"
    assert types["worker.gpu.1xL4"]["resources"]["accelerator_type:L4"] == 1
    assert types["worker.gpu.8xH100"]["resources"]["accelerator_type:H100"] == 1
    workers = {n: t for n, t in types.items() if n != cluster_yaml["head_node_type"]}
    assert {n: (t["min_workers"], t["max_workers"]) for n, t in workers.items()} == {
        "worker.cpu": (0, 4),
        "worker.gpu.1xL4": (0, 8),
        "worker.gpu.8xH100": (0, 2),
    }
    assert cluster_yaml["max_workers"] == sum(t["max_workers"] for t in workers.values())


def test_cluster_yaml_installs_this_package_with_the_right_extras(cluster_yaml, ray_version):
    assert cluster_yaml["docker"]["image"] == _base_image(ray_version)
    assert cluster_yaml["file_mounts"]["~/medrag-ray"] == "."
    assert any('pip install --quiet -e "$HOME/medrag-ray"' == c for c in cluster_yaml["setup_commands"])
    for name, node in cluster_yaml["available_node_types"].items():
        if node["resources"].get("GPU"):
            # A node type's worker_setup_commands replace the global ones entirely.
            assert any("[gpu]" in c and "pip install" in c for c in node["worker_setup_commands"]), name
            # faiss-cpu and faiss-gpu ship the same module: GPU nodes must end with faiss-gpu alone.
            assert any("cluster/use_faiss_gpu.sh" in c for c in node["worker_setup_commands"]), name


def test_cluster_yaml_token_auth_and_dashboard(cluster_yaml):
    assert "--env RAY_AUTH_MODE=token" in cluster_yaml["docker"]["run_options"]
    assert cluster_yaml["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = " ".join(cluster_yaml["head_start_ray_commands"])
    worker_start = " ".join(cluster_yaml["worker_start_ray_commands"])
    for cmd in (head_start, worker_start):
        assert "export RAY_AUTH_MODE=token;" in cmd
        assert "disabled" not in cmd
    assert "ray start --head" in head_start and "--dashboard-host=0.0.0.0" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in worker_start


# ---------------------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (CLUSTER_DIR / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_base_matches_ray_pin_and_cluster_yaml(ray_version, cluster_yaml, project):
    instr = _dockerfile_instructions()
    froms = [arg for op, arg in instr if op == "FROM"]
    assert froms == [_base_image(ray_version)]
    assert froms[0] == cluster_yaml["docker"]["image"]
    py = re.search(r"-py3(\d+)-", froms[0]).group(1)
    assert SpecifierSet(project["requires-python"]).contains(f"3.{py}")


def test_dockerfile_installs_project_as_non_root():
    instr = _dockerfile_instructions()
    users = [arg for op, arg in instr if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    copies = [arg for op, arg in instr if op == "COPY"]
    assert any("pyproject.toml" in c for c in copies)
    assert any(c.split()[-2:] == [".", "."] for c in copies), copies  # the whole project
    runs = " ".join(arg for op, arg in instr if op == "RUN")
    assert 'pip install ".[gpu]"' in runs
    assert 'pip install --no-deps -e ".[gpu]"' in runs
    assert runs.index("use_faiss_gpu.sh") > runs.index('pip install ".[gpu]"')
    workdir = [arg for op, arg in instr if op == "WORKDIR"]
    assert workdir == ["/home/ray/medrag-ray"]


def test_faiss_gpu_swap_script_removes_both_builds_first():
    script = (CLUSTER_DIR / "use_faiss_gpu.sh").read_text()
    lines = [line for line in script.splitlines() if line.startswith("python")]
    assert "uninstall -y faiss-cpu faiss-gpu" in lines[0]
    assert "--no-deps" in lines[1] and "faiss-gpu==" in lines[1]
    pin = re.search(r'"faiss-cpu==([\d.]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert pin and f"FAISS_VERSION:-{pin.group(1)}" in script


def test_dockerignore_keeps_the_context_small():
    ignored = {
        line.strip()
        for line in (CLUSTER_DIR / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", "artifacts", ".venv", "venv", "**/__pycache__"} <= ignored


# ------------------------------------------------------------------------------------------- KubeRay


def test_every_manifest_parses_and_kinds_are_complete():
    docs = _manifests()
    assert set(docs) >= {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml"}
    ray_docs = _ray_docs()
    assert {d["apiVersion"] for d in ray_docs.values()} == {"ray.io/v1"}
    assert sorted(d["kind"] for d in ray_docs.values()) == ["RayCluster", "RayJob", "RayService"]


def test_ray_version_auth_and_head(ray_version):
    for name, doc in _ray_docs().items():
        spec = _ray_cluster_spec(doc)
        assert spec["rayVersion"] == ray_version, name
        assert spec["authOptions"] == {"mode": "token"}, name
        assert spec["enableInTreeAutoscaling"] is True, name
        head = spec["headGroupSpec"]["rayStartParams"]
        assert head["dashboard-host"] == "0.0.0.0" and head["num-cpus"] == "0", name


def test_images_are_one_project_image_everywhere(project):
    images = set()
    for name, doc in _ray_docs().items():
        for group, pod in _pod_specs(_ray_cluster_spec(doc)):
            for c in pod["containers"]:
                images.add(c["image"])
                assert c["workingDir"] == "/home/ray/medrag-ray", (name, group)
    assert images == {f"medrag-ray:{project['version']}"}


def test_worker_groups_resources_and_gpus():
    expected_gpus = {"cpu": 0, "gpu-1xl4": 1, "gpu-8xh100": 8}
    seen: dict[str, set[str]] = {}
    for name, doc in _ray_docs().items():
        spec = _ray_cluster_spec(doc)
        seen[name] = {g["groupName"] for g in spec["workerGroupSpecs"]}
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (name, g["groupName"])
        for group, pod in _pod_specs(spec):
            for c in pod["containers"]:
                limits, requests = c["resources"]["limits"], c["resources"]["requests"]
                assert {"cpu", "memory"} <= set(limits), (name, group)
                assert limits == requests, (name, group)  # Guaranteed QoS: no CPU throttling surprises
                gpus = int(limits.get(GPU_KEY, 0))
                assert gpus == expected_gpus.get(group, 0), (name, group)
            if group.startswith("gpu-"):
                assert {"key": GPU_KEY, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert seen["raycluster.yaml"] == seen["rayjob.yaml"] == set(expected_gpus)
    assert seen["rayservice.yaml"] == {"cpu", "gpu-1xl4"}


def test_every_pod_mounts_the_shared_artifacts_claim():
    pvc = yaml.safe_load((KUBERAY_DIR / "artifacts-pvc.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, doc in _ray_docs().items():
        for group, pod in _pod_specs(_ray_cluster_spec(doc)):
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
            for c in pod["containers"]:
                mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
                assert set(mounts) <= set(volumes), (name, group)
                assert mounts["artifacts"] == "/home/ray/medrag-ray/artifacts", (name, group)


def test_rayjob_entrypoint_and_lifecycle():
    job = _manifests()["rayjob.yaml"]["spec"]
    assert job["entrypoint"] == "python jobs/pipeline.py"
    assert job["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "1" and "RAY_AUTH_MODE" not in env


def test_rayservice_points_at_the_serve_app_builder():
    svc = _manifests()["rayservice.yaml"]["spec"]
    serve_cfg = yaml.safe_load(svc["serveConfigV2"])
    apps = serve_cfg["applications"]
    assert [a["import_path"] for a in apps] == ["serve.app:build_app"]
    module = apps[0]["import_path"].split(":")[0]
    assert (REPO_ROOT / module.split(".")[0] / "__init__.py").is_file()  # `serve` is a package here
    assert serve_cfg["http_options"]["port"] == 8000
    head = _pod_specs(svc["rayClusterConfig"])[0][1]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert head_ports["serve"] == 8000


# -------------------------------------------------------------------------------------- runtime env


@pytest.fixture(scope="module")
def runtime_env() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER_DIR / "runtime_env.yaml").read_text())


def test_runtime_env_fields(runtime_env):
    assert runtime_env["working_dir"] == "."
    assert {".git/", "artifacts/", ".venv/", "venv/"} <= set(runtime_env["excludes"])
    env = runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in env.values())  # Ray rejects non-string env values
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert "RAY_AUTH_MODE" not in env  # must come from the cluster, never from the job


def _ray_package(root: Path, excludes: list[str], out: Path) -> dict[str, int]:
    """Zip ``root`` exactly as Ray packs a working_dir (its own function); name -> size."""
    from ray._private.runtime_env.packaging import _zip_files

    _zip_files(str(root), excludes, str(out), include_gitignore=True)
    with zipfile.ZipFile(out) as zf:
        return {i.filename: i.file_size for i in zf.infolist() if not i.is_dir()}


def test_working_dir_upload_excludes_non_source(runtime_env, tmp_path):
    tree = tmp_path / "repo"
    files = {
        "pyproject.toml": b"[project]\n",
        "medrag_ray/config.py": b"x = 1\n",
        "jobs/make_data.py": b"print()\n",
        ".git/objects/ab/cdef": b"\0" * 4096,
        "artifacts/data/samples_train.parquet": b"\0" * 4096,
        ".venv/bin/python": b"\0",
        "medrag_ray/__pycache__/config.cpython-311.pyc": b"\0",
        "benchmarks/model.safetensors": b"\0" * 4096,
    }
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    (tree / ".gitignore").write_text((REPO_ROOT / ".gitignore").read_text())
    packed = _ray_package(tree, runtime_env["excludes"], tmp_path / "pkg.zip")
    assert set(packed) == {".gitignore", "pyproject.toml", "medrag_ray/config.py", "jobs/make_data.py"}


def test_repository_upload_is_small(runtime_env, tmp_path):
    packed = _ray_package(REPO_ROOT, runtime_env["excludes"], tmp_path / "repo.zip")
    assert "pyproject.toml" in packed and "jobs/runtime.py" in packed
    assert not [n for n in packed if n.startswith((".git/", "artifacts/", ".venv/"))]
    assert sum(packed.values()) < 5 << 20, f"{sum(packed.values()) / 2**20:.1f} MiB of source to upload"
