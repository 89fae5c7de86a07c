# syntax=docker/dockerfile:1
# The orchestration plane: `rexec serve` (Remote Execution API on 8600, outbox relay, events
# consumer, watchdog) in one process; it migrates the database at start-up.
#
#   docker build -f deploy/docker/dispatcher.Dockerfile -t rexec-dispatcher .   (repo root)
#
# Settings come from the environment: REXEC_DATABASE_URL, REXEC_AMQP_URL, REXEC_REDIS_URL,
# REXEC_API_HOST (0.0.0.0 in a container), REXEC_MANAGEMENT_URL and the standard OTEL_*.

# One pinned base for both stages, so the venv's interpreter path is the same in each.
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

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS dispatcher
LABEL org.opencontainers.image.title="rexec-dispatcher" \
      org.opencontainers.image.description="rexec orchestration plane (rexec serve)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/rexec/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REXEC_API_HOST=0.0.0.0 \
    REXEC_API_PORT=8600
RUN groupadd --system --gid 10001 rexec \
 && useradd --system --uid 10001 --gid rexec --home-dir /home/rexec --create-home \
      --shell /usr/sbin/nologin rexec
# The code stays root-owned: the service cannot rewrite what it runs.
COPY --from=builder /opt/rexec /opt/rexec
USER 10001:10001
WORKDIR /home/rexec
EXPOSE 8600
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('REXEC_API_PORT', '8600'), timeout=4)"]
ENTRYPOINT ["rexec"]
CMD ["serve"]
