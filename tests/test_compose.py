"""docker-compose.yml is valid and wires the services as deployed: checked by docker-compose and by reading it."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


PASSWORDS = {"POSTGRES_PASSWORD": "pg-secret", "MINIO_ROOT_PASSWORD": "minio-secret"}


def docker_compose_config(environment: dict[str, str]) -> subprocess.CompletedProcess:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose not found on PATH; install it (apt-get install -y docker-compose)", pytrace=False)
    # Only PATH from this environment: no password set by the caller's shell.
    return subprocess.run([executable, "-f", str(COMPOSE_FILE), "config", "-q"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"]} | environment)


def test_docker_compose_validates_the_file():
    result = docker_compose_config(PASSWORDS)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("unset", sorted(PASSWORDS))
def test_there_is_no_default_password(unset):
    result = docker_compose_config({name: value for name, value in PASSWORDS.items() if name != unset})
    assert result.returncode != 0 and f"set {unset}" in result.stderr, result.stderr


def test_every_pulled_image_names_a_release_on_a_registry_that_serves_it(compose):
    """:latest moves under a deployment, and minio/minio left Docker Hub (September 2026): pulls were denied."""
    pulled = [service["image"] for service in compose["services"].values() if "build" not in service]
    assert pulled and all(":" in image and not image.endswith(":latest") for image in pulled), pulled
    assert not any(image.startswith("minio/") for image in pulled), pulled


def test_services_and_their_health_checks(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "minio", "migrate", "api", "worker", "worker-cpu"}
    for name in ("postgres", "redis", "minio", "api", "worker", "worker-cpu"):
        assert services[name]["healthcheck"]["test"], name
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in services["redis"]["healthcheck"]["test"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in ("worker", "worker-cpu"):
        # The bare Celery app: the worker's own module imports torch and open_clip (seconds, hundreds of MB).
        assert "celery -A broker.celery_app inspect ping" in " ".join(services[name]["healthcheck"]["test"])


def test_start_order(compose):
    services = compose["services"]
    assert services["migrate"]["command"] == ["tvforge", "migrate"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("api", "worker", "worker-cpu"):
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "redis": {"condition": "service_healthy"},
            "minio": {"condition": "service_healthy"},
        }


def test_worker_reserves_a_gpu(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)


def test_the_workers_cover_both_queues_and_only_the_gpu_one_runs_the_model(compose):
    from broker.celery_app import QUEUES

    services = compose["services"]

    def queues(name: str) -> set[str]:
        command = services[name]["command"]
        return set(command[command.index("--queues") + 1].split(","))

    assert queues("worker") == {"model"} and queues("worker-cpu") == {"tensors"}
    assert queues("worker") | queues("worker-cpu") == set(QUEUES)
    assert "deploy" not in services["worker-cpu"]


def test_api_and_worker_share_the_blob_store(compose):
    services = compose["services"]
    for name in ("migrate", "api", "worker", "worker-cpu"):
        environment = services[name]["environment"]
        assert environment["TVFORGE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert environment["TVFORGE_BROKER_URL"] == "redis://redis:6379/0"
    blob_dir = services["api"]["environment"]["TVFORGE_BLOB_DIR"]
    assert services["worker"]["environment"]["TVFORGE_BLOB_DIR"] == blob_dir
    assert f"blobs:{blob_dir}" in services["api"]["volumes"]
    assert f"blobs:{blob_dir}" in services["worker"]["volumes"]
    assert f"blobs:{blob_dir}" in services["worker-cpu"]["volumes"]
    assert services["worker-cpu"]["environment"]["TVFORGE_BLOB_DIR"] == blob_dir
    # ... and, across hosts, the MinIO bucket: the volume is one host's cache of it.
    for name in ("api", "worker", "worker-cpu"):
        environment = services[name]["environment"]
        assert environment["TVFORGE_BLOB_S3_URL"].startswith("s3://")
        assert environment["TVFORGE_BLOB_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert environment["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
        assert environment["AWS_SECRET_ACCESS_KEY"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    assert "blobs" in compose["volumes"]


@pytest.mark.parametrize("dockerfile, command", [("api.Dockerfile", "api"), ("worker.Dockerfile", "worker")])
def test_images_run_tvforge_as_non_root(dockerfile, command):
    text = (ROOT / "docker" / dockerfile).read_text()
    assert "\nUSER tvforge\n" in text
    assert f'CMD ["tvforge", "{command}"]' in text


def test_each_worker_runs_where_it_is_meant_to(compose):
    """The GPU worker exits when it finds no GPU instead of running jobs on the CPU (auto would; tests/test_queues.py
    starts one); the CPU
    worker never takes a GPU, even where the NVIDIA runtime is Docker's default."""
    services = compose["services"]
    assert services["worker"]["environment"]["TVFORGE_DEVICE"] == "cuda"
    assert services["worker-cpu"]["environment"]["TVFORGE_DEVICE"] == "cpu"
    assert services["worker-cpu"]["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"
    # PyPI's default torch is a CUDA 13 build (driver 580 or later): the image names the CUDA 12 index.
    assert "--index-url https://download.pytorch.org/whl/cu12" in (ROOT / "docker" / "worker.Dockerfile").read_text()


def test_the_api_and_workers_get_time_to_stop_before_docker_kills_them(compose):
    from tvforge.settings import Settings

    grace = compose["services"]["api"]["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > Settings.model_fields["graceful_shutdown_s"].default
    # Workers hand their running job back between steps on SIGTERM (tests/test_job_lifecycle.py), or store the
    # checkpoint of one that has done its work: given minutes to.
    for name in ("worker", "worker-cpu"):
        grace = compose["services"][name]["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) >= 300


def test_postgres_counts_as_healthy_only_once_it_takes_tcp_connections(compose):
    assert "-h 127.0.0.1" in " ".join(compose["services"]["postgres"]["healthcheck"]["test"])


def test_the_build_context_is_the_installable_sources_only():
    """An allowlist: a working checkout's virtual environments and benchmark assets (hundreds of MB) stay out."""
    import tomllib

    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    included = {line[1:] for line in lines if line.startswith("!")}
    assert lines[lines.index("*")] == "*"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {pattern.rstrip("*") for pattern in packages["include"]} | {"pyproject.toml", "README.md"} == included
