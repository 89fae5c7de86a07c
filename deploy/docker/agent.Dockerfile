# syntax=docker/dockerfile:1
# The execution plane's agent: `rexec-agent --pool P [--concurrency N] [--allow PATTERN]...`,
# its token in REXEC_AGENT_TOKEN, the dispatcher's address in REXEC_API_URL.
#
#   docker build -f deploy/docker/agent.Dockerfile -t rexec-agent .   (repo root)
#
# This image is a base: an agent runs only the code it can import, so a customer builds their
# own image FROM it with their task packages (see deploy/docker/README.md):
#
#   FROM rexec-agent:0.1.0
#   USER root
#   RUN pip install --no-cache-dir acme-tasks==1.4.2
#   USER 10001:10001
#
# and runs it with `--allow 'acme_tasks.*:*'`. The `demo` stage below does exactly that with
# the repo's demo tasks (compose.yaml builds it with `target: demo`).

# One pinned base for all stages, so the venv's interpreter path is the same in each.
# Pin a digest too (python:3.11.11-slim-bookworm@sha256:...) for reproducible production builds.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- builder: a wheel of rexec, installed with its dependencies into /opt/rexec --------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/rexec \
 && /opt/rexec/bin/pip install /wheels/rexec-*.whl

# --- agent: the base image customers extend ------------------------------------------------
FROM ${PYTHON_IMAGE} AS agent
LABEL org.opencontainers.image.title="rexec-agent" \
      org.opencontainers.image.description="rexec execution-plane agent; extend it with your task packages" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/rexec/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 rexec \
 && useradd --system --uid 10001 --gid rexec --home-dir /home/rexec --create-home \
      --shell /usr/sbin/nologin rexec
# The code stays root-owned: tasks run as the agent's user and cannot rewrite the agent.
COPY --from=builder /opt/rexec /opt/rexec
USER 10001:10001
WORKDIR /home/rexec
# Until the agent has a health port: the agent (PID 1) is alive and neither stopped (SIGSTOP,
# state T) nor a zombie. The agent reaps its own task processes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys; state = open('/proc/1/stat').read().rsplit(')', 1)[1].split()[0]; sys.exit(state in 'TtZXx')"]
# SIGTERM drains: give the container a stop grace period as long as a task may need to finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rexec-agent"]

# --- demo: the agent plus the repo's demo tasks (demo.tasks), as a customer image would be ---
FROM agent AS demo
COPY demo/ /opt/rexec-demo/demo/
ENV PYTHONPATH=/opt/rexec-demo

# --- default target: the plain agent image --------------------------------------------------
FROM agent
