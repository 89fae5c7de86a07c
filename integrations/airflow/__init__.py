"""Apache Airflow 3 on rexec: the scheduler hands task instances to rexec agents.

- ``rexec.airflow.executor.RexecExecutor``: the executor (``AIRFLOW__CORE__EXECUTOR``), on the
  orchestration side beside Airflow's scheduler; a client of the rexec API, nothing more.
- ``rexec.airflow.runner``: what an agent runs (``rexec.airflow.runner:run_workload``): the task
  SDK's supervisor, forked from a child that has Airflow imported already.
- ``rexec.airflow.logs``: the API server reads a try's log from the agent that ran it.
- ``rexec.airflow.config``: the ``[rexec]`` section of Airflow's configuration.

Needs ``pip install 'rexec[airflow]'`` next to Airflow 3.3 or newer.
"""
