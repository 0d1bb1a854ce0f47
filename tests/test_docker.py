"""What can be checked of the Docker image and compose files without a Docker engine."""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement

from tests.serving.conftest import Server

ROOT = Path(__file__).resolve().parents[1]


def requirements(variant: str) -> dict[str, str]:
    lines = (ROOT / f"docker/requirements-{variant}.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line and not line.startswith("#")]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in pins), "pins only"
    return {r.name.lower().replace("_", "-"): next(iter(r.specifier)).version for r in pins}


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    assert "nvidia/cuda:13" in text and "cudnn" in text
    assert text.count("FROM ") == 2 and "AS build" in text and "COPY --from=build /opt/venv" in text
    assert "USER 10001" in text and "EXPOSE 8000 8001" in text and "/v2/health/ready" in text
    assert 'ENTRYPOINT ["python3", "-m", "service"]' in text and "torch" not in text
    for source in ("service/", "default_model/model.onnx"):
        assert (ROOT / source).exists()


def test_image_requirements_match_the_project():
    cpu, gpu = requirements("cpu"), requirements("gpu")
    assert gpu.pop("onnxruntime-gpu") == cpu.pop("onnxruntime")
    assert gpu == cpu
    assert "torch" not in cpu
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, project):
        name, (pin,) = dep.name.lower().replace("_", "-"), dep.specifier
        assert pin.operator == "==" and requirements("cpu")[name] == pin.version, f"{name} differs from the image"


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory):
    """The image's exact requirement set in a fresh venv (the CPU wheel in place of the GPU one)."""
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(venv / "bin/pip"),
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            str(ROOT / "docker/requirements-cpu.txt"),
        ],
        check=True,
    )
    return venv


def test_the_service_runs_on_exactly_the_image_requirements(image_venv):
    python = str(image_venv / "bin/python")
    env = {"PYTHONPATH": str(ROOT), "PATH": f"{image_venv / 'bin'}:{os.environ['PATH']}"}
    subprocess.run(
        [python, "-c", "import service.main, sys; assert 'torch' not in sys.modules"],
        check=True,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    server = Server({**env, "WARN_WORKERS": "1"}, python=python, launcher=True)  # the image's entrypoint
    try:
        server.wait_ready()
        from PIL import Image

        from tests.serving.conftest import png

        r = httpx.post(
            f"{server.url}/v1/predict", content=png(Image.new("RGB", (32, 32))), headers={"content-type": "image/png"}
        )
        assert r.status_code == 200 and r.json()["top_k"]
        overlay = httpx.get(r.json()["attention_urls"]["combined"])
        assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    finally:
        server.stop()


def compose(*args: str) -> str:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is missing: `make test` installs it (Debian package docker-compose)"
    result = subprocess.run([tool, "-f", "docker-compose.yml", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_file_is_valid(profile):
    config = yaml.safe_load(compose("--profile", profile, "config"))
    services = config["services"]
    warn = services[f"warn-{profile}"]
    assert {"redis", "nginx"} <= set(services)
    assert warn["environment"]["WARN_STORE"] == "redis"
    assert warn["deploy"]["replicas"] >= 2 and warn["restart"] == "unless-stopped"
    assert "/v2/health/ready" in " ".join(warn["healthcheck"]["test"])
    assert any(str(v).endswith(":/models:ro") for v in warn["volumes"])
    devices = warn["deploy"].get("resources", {}).get("reservations", {}).get("devices", [])
    if profile == "gpu":
        assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    else:
        assert not devices and warn["build"]["args"]["VARIANT"] == "cpu"
    assert "warn" in warn["networks"]["default"]["aliases"]
    nginx = (ROOT / "docker/nginx.conf").read_text()
    assert "http://warn:8000" in nginx and "resolver 127.0.0.11" in nginx
    # the v2 protocol over gRPC goes through nginx as HTTP/2 to every replica's port 8001
    assert {"8000", "8001"} <= {str(p) for p in warn["expose"]}
    assert {(int(p["published"]), p["target"]) for p in services["nginx"]["ports"]} >= {(8001, 8001)}
    assert "grpc://warn:8001" in nginx and "http2 on;" in nginx
    assert warn["environment"]["UVICORN_ACCESS_LOG"] == "false"  # nginx logs each request once, in front
    for name, service in services.items():
        assert service["logging"]["options"]["max-size"] == "10m", f"{name} keeps its logs without bound"


def test_nginx_accepts_its_config(tmp_path):
    """`nginx -t` on the shipped config, as the image's nginx loads it (inside `http {}`), and the request id
    it hands on. Debian's nginx (1.22) predates `http2 on;` (1.25.1), which the image's 1.27 reads: here the
    gRPC server says it the older way, `listen ... http2`. Everything else is checked as shipped."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).is_file(), "nginx is missing: `make test` installs it (Debian package nginx-light)"
    shipped = (ROOT / "docker/nginx.conf").read_text()
    assert shipped.count("    http2 on;\n") == 1 and shipped.count("    listen 8001;\n") == 1
    older = shipped.replace("    http2 on;\n", "").replace("    listen 8001;\n", "    listen 8001 http2;\n")
    (tmp_path / "default.conf").write_text(older.replace("/var/log/nginx/", f"{tmp_path}/"))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{ access_log off; client_body_temp_path {tmp_path}; include {tmp_path}/default.conf; }}\n"
    )
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    # the client's X-Request-ID, else nginx's own, reaches the service and nginx's access line
    assert "proxy_set_header X-Request-ID $warn_request_id;" in shipped and "request_id=$warn_request_id" in shipped


def test_monitoring_profile_mounts_the_shipped_configs():
    config = yaml.safe_load(compose("--profile", "cpu", "--profile", "monitoring", "config"))
    services = config["services"]
    assert {"prometheus", "grafana"} <= set(services)
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        assert services[name]["logging"]["options"]["max-file"] == "3"
        for volume in services[name]["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            assert Path(source).exists(), f"{name} mounts {source}, which is missing"
