# syntax=docker/dockerfile:1
# A rexec agent that runs Apache Airflow 3 tries (RexecExecutor on the scheduler's side): the
# rexec-agent image plus Airflow's task SDK, your DAG files and the providers they use.
#
#   docker build -f deploy/docker/agent.Dockerfile -t rexec-agent .          (repo root, once)
#   docker build -f deploy/docker/airflow-agent.Dockerfile -t acme-airflow-agent \
#     --build-context dags=path/to/your/dags .
#
# Run it with `--pool <pool> --allow 'rexec.airflow.runner:*'` and
# AIRFLOW__CORE__EXECUTION_API_SERVER_URL pointing at Airflow's API server (`/execution/`);
# deploy/helm/ci/rexec-agent.airflow.yaml is a Helm values file for it. The agent needs no
# metadata database and no JWT secret: each workload carries its own short-lived token.
# Connections and variables resolve through Airflow's secrets backend configured here
# (AIRFLOW__SECRETS__BACKEND, ...), inside your cluster.

ARG REXEC_AGENT_IMAGE=rexec-agent:0.1.0
FROM ${REXEC_AGENT_IMAGE}

# The versions your scheduler runs: the task SDK talks to that API server's Execution API.
ARG AIRFLOW_VERSION=3.3.2
ARG TASK_SDK_VERSION=1.3.2
# Providers (and any library) your DAGs import, e.g. "apache-airflow-providers-postgres==6.2.0".
ARG EXTRA_PACKAGES=""

USER root
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/rexec/bin/pip install --no-cache-dir \
      "apache-airflow-core==${AIRFLOW_VERSION}" \
      "apache-airflow-task-sdk==${TASK_SDK_VERSION}" \
      ${EXTRA_PACKAGES}
# The DAG files, read-only for the agent's user (a DAG bundle works the same way).
COPY --from=dags --chown=root:root . /opt/airflow/dags
RUN mkdir -p /opt/airflow/home && chown 10001:10001 /opt/airflow/home
ENV AIRFLOW_HOME=/opt/airflow/home \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False
USER 10001:10001
