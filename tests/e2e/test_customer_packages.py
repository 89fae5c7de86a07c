"""A customer's own ``worker``, ``schemas``, ``client`` and ``dispatcher`` packages coexist with
rexec: everything of rexec's lives under ``rexec``, and function children start with ``-P``.

The customer's code base is both the agent's working directory and on its ``PYTHONPATH``, as a
customer image would have it; ``rexec`` and ``rexec-agent`` are the installed console scripts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rexec.schemas.api import TaskState
from tests.e2e.conftest import Plane
from tests.support import Process, wait_until

SCRIPTS = Path(sys.executable).parent
SHADOWS = ("worker", "schemas", "client", "dispatcher")


def customer_code(root: Path) -> Path:
    """A code base whose top-level packages take each of rexec's old names."""
    for name in SHADOWS:
        package = root / name
        package.mkdir(parents=True)
        # Imported in rexec's place, any of these would break it at once.
        (package / "__init__.py").write_text(f"CUSTOMER = {name!r}\n")
    (root / "worker" / "jobs.py").write_text(
        "import client, dispatcher, schemas\n\n"
        "def double(x: int) -> int:\n"
        "    assert (client.CUSTOMER, schemas.CUSTOMER, dispatcher.CUSTOMER) == "
        "('client', 'schemas', 'dispatcher')\n"
        "    return 2 * x\n\n"
        "if __name__ == '__main__':\n"
        "    import sys\n"
        "    print('doubled', double(int(sys.argv[1])))\n"
    )
    return root


def test_customer_packages_named_like_rexecs_own(plane: Plane, tmp_path: Path) -> None:
    code = customer_code(tmp_path / "acme")
    env = {**plane.env, "PYTHONPATH": str(code)}
    pool = "acme"

    cli = subprocess.run(
        [SCRIPTS / "rexec", "pool", "create", pool],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    token = plane.client.create_token(pool).secret
    agent = Process(
        [
            str(SCRIPTS / "rexec-agent"),
            "--pool",
            pool,
            "--allow",
            "worker.jobs:*",
            "--allow",
            sys.executable,
        ],
        {**env, "REXEC_AGENT_TOKEN": token},
        tmp_path / "agent.log",
        cwd=code,
    )
    plane.processes.append(agent)
    wait_until(
        lambda: any(a.state == "online" for a in plane.client.list_agents(pool=pool)),
        30,
        "the agent started from the customer's directory to go live",
    )

    function = plane.client.submit(pool, "worker.jobs:double", args=[21])
    command = plane.client.submit(pool, command=[sys.executable, "-m", "worker.jobs", "21"])
    done = {t.id: t for t in plane.client.wait([function.id, command.id], timeout=60)}

    assert done[function.id].state is TaskState.SUCCEEDED, done[function.id].error
    assert done[function.id].result == 42
    assert done[command.id].state is TaskState.SUCCEEDED, done[command.id].error
    assert "doubled 42" in done[command.id].result["output"]

    status = subprocess.run(
        [SCRIPTS / "rexec", "status", function.id, "--json"],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert '"succeeded"' in status.stdout
