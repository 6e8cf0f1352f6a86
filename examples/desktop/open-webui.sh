#!/bin/sh
# Open WebUI in Docker talking to `agent-runtime serve` on the host.
# --network=host lets the container reach 127.0.0.1:8000, so the server can stay bound to loopback and the
# Host header stays 127.0.0.1 (a Host such as host.docker.internal would be refused as DNS rebinding).
# Open WebUI is then at http://127.0.0.1:8080; the model and every agent appear in its model list.
exec docker run -d --name open-webui --network=host \
  -e OPENAI_API_BASE_URL=http://127.0.0.1:8000/v1 \
  -e OPENAI_API_KEY="${AGENT_RUNTIME_API_KEY:-unused}" \
  -e ENABLE_OLLAMA_API=false \
  -v open-webui:/app/backend/data \
  ghcr.io/open-webui/open-webui:main
