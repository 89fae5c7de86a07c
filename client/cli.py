"""``rexec``: run the orchestration plane, and manage pools, tokens, agents and tasks.

Every command but ``serve`` talks to the Remote Execution API through :class:`~rexec.client.RexecClient`
(``REXEC_API_URL`` or ``--api-url``). Listings print tables, or JSON with ``--json``.
Exit status: 0 success, 1 an error from the API (or a task that did not succeed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live

from rexec.client import RexecClient, RexecError
from rexec.client.agentlog import AgentLogUnavailable, stream_agent_log
from rexec.schemas import tls
from rexec.schemas.api import Role, TaskState
from rexec.schemas.settings import load_settings

from . import _credentials as credentials
from . import cli_format as fmt
from . import top

Handler = Callable[[argparse.Namespace, "Context"], int]

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
PIPE_WIDTH = 240
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(Exception):
    """A command line that cannot be run; reported like argparse's own errors (exit 2)."""


class Context:
    """What a command needs: the output console and (lazily) the API client."""

    def __init__(self, api_url: str | None) -> None:
        self.api_url = api_url
        # Piped output is not cut to 80 columns: a table row stays one greppable line.
        self.out = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
        self.err = Console(stderr=True)
        self._client: RexecClient | None = None

    @property
    def client(self) -> RexecClient:
        if self._client is None:
            self._client = RexecClient(self.api_url)
        return self._client

    def json(self, value: Any) -> None:
        sys.stdout.write(fmt.to_json(value) + "\n")

    def show(self, as_json: bool, value: Any, table: Callable[[], RenderableType]) -> None:
        """``value`` as JSON (``--json``), else the table made of it."""
        if as_json:
            self.json(value)
        else:
            self.out.print(table())

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


# --- argument types ---------------------------------------------------------------------------


def duration(text: str) -> float:
    """Seconds from ``3600``, ``3600s``, ``90m``, ``12h``, ``30d`` or ``2w``."""
    match = DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a positive number with an optional unit, "
            "like 3600s, 90m, 12h or 30d"
        )
    return float(match.group(1)) * UNITS[match.group(2)]


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def exit_code(text: str) -> int:
    value = positive_int(text)
    if value > 255:
        raise argparse.ArgumentTypeError(f"an exit code is 1 to 255, got {text}")
    return value


def json_value(option: str, text: str | None, kind: type[list[Any]] | type[dict[str, Any]]) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{option} is not valid JSON ({exc}): got {text!r}") from None
    if not isinstance(value, kind):
        what = (
            "a JSON array, like '[1, \"a\"]'"
            if kind is list
            else "a JSON object, like '{\"n\": 1}'"
        )
        raise UsageError(f"{option} must be {what}; got {type(value).__name__} {text!r}")
    return value


# --- commands ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, ctx: Context) -> int:
    from rexec.dispatcher import (
        serve,  # the server's dependencies are not needed by the other commands
    )

    try:
        settings = load_settings()
        tls.server_files(settings.api_tls_cert, settings.api_tls_key)
        serve.check_bootstrap_key(settings)
    except ValueError as exc:  # a bad setting, or a TLS file that cannot be used
        raise UsageError(str(exc)) from None
    serve.main(settings)
    return 0


def cmd_pool_create(args: argparse.Namespace, ctx: Context) -> int:
    pool = ctx.client.create_pool(args.name, args.description, max_running=args.max_running)
    limit = "" if pool.max_running is None else f", at most {pool.max_running} running"
    ctx.out.print(f"created pool {pool.name} (queue rexec.pool.{pool.name}{limit})")
    return 0


def cmd_pool_update(args: argparse.Namespace, ctx: Context) -> int:
    if args.unlimited == (args.max_running is not None):
        raise UsageError("give one of --max-running N or --unlimited")
    pool = ctx.client.update_pool(args.name, max_running=args.max_running)
    if pool.max_running is None:
        ctx.out.print(f"pool {pool.name}: no limit on running tasks")
    else:
        ctx.out.print(
            f"pool {pool.name}: at most {pool.max_running} tasks running (or sent to agents); "
            "the others wait queued"
        )
    return 0


def cmd_pool_list(args: argparse.Namespace, ctx: Context) -> int:
    pools = ctx.client.list_pools()
    ctx.show(args.json, pools, lambda: fmt.pools_table(pools, ctx.out.width))
    return 0


def cmd_pool_drain(args: argparse.Namespace, ctx: Context) -> int:
    pool = ctx.client.drain_pool(args.name)
    queued = pool.tasks.get(TaskState.QUEUED.value, 0)
    ctx.out.print(
        f"pool {pool.name} is draining: its {queued} queued task(s) wait until "
        f"`rexec pool resume {pool.name}`"
    )
    return 0


def cmd_pool_resume(args: argparse.Namespace, ctx: Context) -> int:
    pool = ctx.client.resume_pool(args.name)
    ctx.out.print(f"pool {pool.name} resumed")
    return 0


def cmd_token_create(args: argparse.Namespace, ctx: Context) -> int:
    created = ctx.client.create_token(args.pool, args.name, expires_in=args.expires)
    if args.json:
        ctx.json(created)
    else:
        # Only the secret on stdout, so `TOKEN=$(rexec token create --pool p)` works.
        sys.stdout.write(created.secret + "\n")
    if args.quiet:
        return 0
    expires = f", expires {fmt.when(created.token.expires_at)}" if created.token.expires_at else ""
    ctx.err.print(
        f"created token {created.token.id} for pool {created.token.pool}{expires}.\n"
        "[bold yellow]Store the secret now: it will not be shown again.[/] "
        "Give it to the agents as REXEC_AGENT_TOKEN."
    )
    return 0


def cmd_token_list(args: argparse.Namespace, ctx: Context) -> int:
    tokens = ctx.client.list_tokens(pool=args.pool)
    ctx.show(args.json, tokens, lambda: fmt.tokens_table(tokens))
    return 0


def cmd_token_revoke(args: argparse.Namespace, ctx: Context) -> int:
    token = ctx.client.revoke_token(args.id)
    ctx.out.print(f"revoked token {token.id} of pool {token.pool}")
    return 0


def cmd_apikey_create(args: argparse.Namespace, ctx: Context) -> int:
    created = ctx.client.create_api_key(args.role, args.name, expires_in=args.expires)
    if args.json:
        ctx.json(created)
    else:
        sys.stdout.write(created.secret + "\n")  # alone on stdout: KEY=$(rexec apikey create ...)
    if args.quiet:
        return 0
    key = created.key
    expires = f", expires {fmt.when(key.expires_at)}" if key.expires_at else ""
    ctx.err.print(
        f"created API key {key.id} with the {key.role.value} role{expires}.\n"
        "[bold yellow]Store the secret now: it will not be shown again.[/] "
        "Use it with `rexec login` or as REXEC_API_KEY."
    )
    return 0


def cmd_apikey_list(args: argparse.Namespace, ctx: Context) -> int:
    keys = ctx.client.list_api_keys()
    ctx.show(args.json, keys, lambda: fmt.api_keys_table(keys))
    return 0


def cmd_apikey_revoke(args: argparse.Namespace, ctx: Context) -> int:
    key = ctx.client.revoke_api_key(args.id)
    ctx.out.print(f"revoked API key {key.id} ({key.name or key.role.value})")
    return 0


def _read_key(args: argparse.Namespace) -> str:
    key: str
    if args.key is not None:
        key = str(args.key)
    elif sys.stdin.isatty():
        key = getpass.getpass("API key: ")
    else:
        key = sys.stdin.readline()
    key = key.strip()
    if not key:
        raise UsageError("no API key given: pass --key KEY, pipe it on stdin, or type it")
    return key


def cmd_login(args: argparse.Namespace, ctx: Context) -> int:
    key = _read_key(args)
    settings = load_settings()
    api_url = ctx.api_url or settings.api_url
    with RexecClient(api_url, api_key=key) as client:
        who = client.login()
        file = credentials.store(settings, client.base_url, key)
    name = f" ({who.name})" if who.name and who.kind != "bootstrap" else ""
    ctx.out.print(
        f"logged in to {api_url} as {who.kind} {who.id}{name} with the {who.role.value} role; "
        f"the key is stored in {file} (mode 0600)"
    )
    if settings.api_key:
        ctx.err.print(
            "[yellow]note:[/] REXEC_API_KEY is set and is used before the stored key: "
            "unset it to use this login"
        )
    return 0


def cmd_audit(args: argparse.Namespace, ctx: Context) -> int:
    entries = ctx.client.audit(limit=args.limit)
    ctx.show(args.json, entries, lambda: fmt.audit_table(entries))
    return 0


def cmd_agents(args: argparse.Namespace, ctx: Context) -> int:
    agents = ctx.client.list_agents(pool=args.pool)
    ctx.show(args.json, agents, lambda: fmt.agents_table(agents, ctx.out.width))
    return 0


def cmd_submit(args: argparse.Namespace, ctx: Context) -> int:
    command: list[str] | None = None
    target: str | None = None
    if args.is_command:
        if not args.argv:
            raise UsageError("--command needs the argv to run after '--', like: --command -- ls -l")
        if args.args is not None or args.kwargs is not None:
            raise UsageError("--args and --kwargs apply to a TARGET, not to --command")
        command = list(args.argv)
    elif args.final_exit_codes:
        raise UsageError("--final-exit-code applies to --command tasks, not to a TARGET")
    elif len(args.argv) != 1:
        raise UsageError(
            "give one TARGET (module:function), or --command -- argv... for a command task"
        )
    else:
        target = args.argv[0]
    call_args = json_value("--args", args.args, list)
    call_kwargs = json_value("--kwargs", args.kwargs, dict)
    task = ctx.client.submit(
        args.pool,
        target,
        command=command,
        args=call_args,
        kwargs=call_kwargs,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        retry_backoff=args.retry_backoff,
        expires_in=args.expires_in,
        idempotency_key=args.key,
        secrets=args.secrets,
        sensitive=args.sensitive,
        final_exit_codes=args.final_exit_codes,
    )
    sys.stdout.write(task.id + "\n")
    return 0


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    task = ctx.client.get(args.id)
    ctx.show(args.json, task, lambda: fmt.task_detail(task))
    return 0


def cmd_wait(args: argparse.Namespace, ctx: Context) -> int:
    tasks = ctx.client.wait(args.ids, timeout=args.timeout)
    if args.json:
        ctx.json(tasks)
    else:
        for task in tasks:
            ctx.out.print(fmt.wait_line(task))
    unfinished = [t.id for t in tasks if not t.state.terminal]
    if unfinished:
        ctx.err.print(
            f"rexec: {len(unfinished)} task(s) still not finished after {args.timeout:g}s"
        )
    return 0 if all(t.state is TaskState.SUCCEEDED for t in tasks) else 1


def cmd_cancel(args: argparse.Namespace, ctx: Context) -> int:
    task = ctx.client.cancel(args.id)
    if task.state is TaskState.CANCELLED:
        ctx.out.print(f"cancelled {task.id}")
    else:
        ctx.out.print(
            f"cancel requested for {task.id}: agent {task.agent_id} is stopping it "
            f"(follow it with `rexec wait {task.id}`)"
        )
    return 0


def cmd_tasks(args: argparse.Namespace, ctx: Context) -> int:
    tasks = ctx.client.list_tasks(pool=args.pool, state=args.state, limit=args.limit)
    ctx.show(args.json, tasks, lambda: fmt.tasks_table(tasks, width=ctx.out.width))
    return 0


def cmd_events(args: argparse.Namespace, ctx: Context) -> int:
    entries = ctx.client.history(args.id)
    ctx.show(args.json, entries, lambda: fmt.history_table(args.id, entries))
    return 0


def cmd_logs(args: argparse.Namespace, ctx: Context) -> int:
    """The whole log, read from the agent that keeps it; else the stored tail and why not."""
    grant = ctx.client.log_grant(args.id, args.attempt)
    if not (grant.log_ref or grant.log_tail or grant.running):
        ctx.err.print(
            f"rexec: task {grant.task_id} attempt {grant.attempt} kept no log: it succeeded "
            "without printing anything (such an attempt leaves none), or its agent could not "
            "write one",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        return 0
    out = sys.stdout.buffer

    def write(chunk: bytes) -> None:
        out.write(chunk)
        out.flush()

    try:
        stream_agent_log(grant, write, follow=args.follow)
        return 0
    except AgentLogUnavailable as exc:
        why = str(exc)
    if grant.log_tail:
        sys.stdout.write(grant.log_tail)
        sys.stdout.flush()
    where = f" at {grant.log_ref}" if grant.log_ref else ""
    shown = (
        "above: the last lines the dispatcher keeps"
        if grant.log_tail
        else "the dispatcher keeps no tail of it"
        + (" yet: the attempt is still running" if grant.running else "")
    )
    ctx.err.print(
        f"rexec: the full log of task {grant.task_id} attempt {grant.attempt} lives on agent "
        f"{grant.agent_id} ({grant.agent_state}){where} and could not be fetched: {why}. "
        f"Shown {shown}.",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    return 1


def cmd_top(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client
    rates = top.Rates()

    def view() -> tuple[Any, top.Snapshot]:
        snapshot = top.take(client, args.pool, args.limit)
        if snapshot.error is None:  # an outage is a gap in the rates, not a drop to zero
            rates.add(snapshot.pools)
        shown = fmt.top_view(client.base_url, snapshot, rates, args.interval, ctx.out.width)
        return shown, snapshot

    if args.once:
        shown, snapshot = view()
        ctx.out.print(shown)
        return 1 if snapshot.error else 0  # the live view waits for the API to come back
    # Refresh on a fixed beat (not `interval` after each refresh), in the terminal's alternate
    # screen like top(1), so the view stays in place however tall it is.
    try:
        with Live(view()[0], console=ctx.out, screen=True, auto_refresh=False) as live:
            beat = time.monotonic()
            while True:
                beat += args.interval
                time.sleep(max(0.0, beat - time.monotonic()))
                beat = max(beat, time.monotonic() - args.interval)  # a slow API skips beats
                live.update(view()[0], refresh=True)
    except KeyboardInterrupt:
        pass
    return 0


# --- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api-url",
        default=argparse.SUPPRESS,
        help="the Remote Execution API (default: REXEC_API_URL, else http://127.0.0.1:8600)",
    )
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON instead of a table")

    parser = argparse.ArgumentParser(
        prog="rexec",
        description="rexec: run Python functions and commands on remote agent pools.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def command(
        sub: Any, name: str, handler: Handler, help: str, parents: Sequence[Any] = ()
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help, description=help, parents=[common, *parents]
        )
        p.set_defaults(handler=handler)
        return p

    command(commands, "serve", cmd_serve, "run the orchestration plane (API, relay, events)")

    pool = commands.add_parser("pool", help="create, list, drain and resume agent pools")
    pool_sub = pool.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    p = command(pool_sub, "create", cmd_pool_create, "create a pool and its queue")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--description", default="", help="what the pool is for")
    p.add_argument(
        "--max-running",
        type=positive_int,
        metavar="N",
        help="at most N of its tasks running (or sent to agents) at once; the rest wait queued",
    )
    command(pool_sub, "list", cmd_pool_list, "pools with task counts by state", [json_flag])
    p = command(pool_sub, "drain", cmd_pool_drain, "stop sending the pool's tasks to agents")
    p.add_argument("name", metavar="NAME")
    p = command(pool_sub, "resume", cmd_pool_resume, "send the pool's tasks again")
    p.add_argument("name", metavar="NAME")
    p = command(pool_sub, "update", cmd_pool_update, "change a pool's limit of running tasks")
    p.add_argument("name", metavar="NAME")
    limit = p.add_mutually_exclusive_group()
    limit.add_argument("--max-running", type=positive_int, metavar="N", help="the new limit")
    limit.add_argument("--unlimited", action="store_true", help="remove the limit")

    token = commands.add_parser("token", help="create, list and revoke agent tokens")
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    p = command(
        token_sub,
        "create",
        cmd_token_create,
        "create an agent token (prints the secret once)",
        [json_flag],
    )
    p.add_argument("--pool", required=True, help="the pool the token's agents serve")
    p.add_argument("--name", default="", help="a label, such as the cluster it is for")
    p.add_argument(
        "--expires", type=duration, metavar="DURATION", help="lifetime: 3600s, 90m, 12h, 30d"
    )
    p.add_argument(
        "--quiet", action="store_true", help="print only the secret (no reminder on stderr)"
    )
    p = command(
        token_sub, "list", cmd_token_list, "agent tokens (never their secrets)", [json_flag]
    )
    p.add_argument("--pool", help="only this pool's tokens")
    p = command(token_sub, "revoke", cmd_token_revoke, "revoke a token")
    p.add_argument("id", metavar="ID")

    apikey = commands.add_parser("apikey", help="create, list and revoke operator API keys")
    apikey_sub = apikey.add_subparsers(dest="apikey_command", metavar="ACTION", required=True)
    p = command(
        apikey_sub,
        "create",
        cmd_apikey_create,
        "create an API key with a role (prints the secret once)",
        [json_flag],
    )
    p.add_argument(
        "--role",
        required=True,
        choices=[r.value for r in Role],
        help="viewer: read-only; submitter: + submit and cancel tasks; admin: everything",
    )
    p.add_argument("--name", default="", help="a label: who or what uses it")
    p.add_argument(
        "--expires", type=duration, metavar="DURATION", help="lifetime: 3600s, 90m, 12h, 30d"
    )
    p.add_argument(
        "--quiet", action="store_true", help="print only the secret (no reminder on stderr)"
    )
    command(apikey_sub, "list", cmd_apikey_list, "API keys (never their secrets)", [json_flag])
    p = command(apikey_sub, "revoke", cmd_apikey_revoke, "revoke an API key")
    p.add_argument("id", metavar="ID")

    p = command(
        commands,
        "login",
        cmd_login,
        "check an API key against the API and store it for the CLI (mode 0600)",
    )
    p.add_argument("--key", help="the key (default: read from stdin, or prompt)")

    p = command(
        commands, "audit", cmd_audit, "who did what: token, key and pool actions", [json_flag]
    )
    p.add_argument("--limit", type=positive_int, default=100, metavar="N", help="at most N")

    p = command(commands, "agents", cmd_agents, "agents and their heartbeats", [json_flag])
    p.add_argument("--pool", help="only this pool's agents")

    p = command(
        commands,
        "submit",
        cmd_submit,
        "submit a task and print its id: TARGET (module:function) or --command -- argv...",
    )
    p.add_argument("--pool", required=True, help="the pool to run it on")
    p.add_argument(
        "--command",
        dest="is_command",
        action="store_true",
        help="run a command: its argv follows after '--'",
    )
    p.add_argument("argv", nargs="*", metavar="TARGET", help="module:function (or the argv)")
    p.add_argument("--args", metavar="JSON", help="positional arguments as a JSON array")
    p.add_argument("--kwargs", metavar="JSON", help="keyword arguments as a JSON object")
    p.add_argument("--timeout", type=positive_float, metavar="S", help="seconds per attempt")
    p.add_argument("--max-attempts", type=positive_int, metavar="N", help="attempts in all")
    p.add_argument(
        "--retry-backoff", type=non_negative_float, metavar="S", help="base seconds between tries"
    )
    p.add_argument(
        "--expires-in", type=positive_float, metavar="S", help="expire if not started in S seconds"
    )
    p.add_argument("--key", metavar="K", help="idempotency key: a resubmission returns the task")
    p.add_argument(
        "--secret",
        dest="secrets",
        action="append",
        default=[],
        metavar="NAME",
        help="a secret the agent resolves for the task (only the name is sent); repeatable",
    )
    p.add_argument(
        "--sensitive",
        action="store_true",
        help="hide the task's arguments from viewer API keys",
    )
    p.add_argument(
        "--final-exit-code",
        dest="final_exit_codes",
        action="append",
        default=[],
        type=exit_code,
        metavar="CODE",
        help="a --command exit code that fails the task with no retry; repeatable",
    )

    p = command(commands, "status", cmd_status, "one task in detail", [json_flag])
    p.add_argument("id", metavar="ID")

    p = command(
        commands,
        "wait",
        cmd_wait,
        "wait for tasks to finish; exit 0 only if every one succeeded",
        [json_flag],
    )
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--timeout", type=positive_float, metavar="S", help="give up after S seconds")

    p = command(commands, "cancel", cmd_cancel, "cancel a task")
    p.add_argument("id", metavar="ID")

    p = command(commands, "tasks", cmd_tasks, "recent tasks, newest first", [json_flag])
    p.add_argument("--pool", help="only this pool's tasks")
    p.add_argument("--state", choices=[s.value for s in TaskState], help="only tasks in this state")
    p.add_argument("--limit", type=positive_int, default=100, metavar="N", help="at most N")

    p = command(commands, "events", cmd_events, "a task's state history", [json_flag])
    p.add_argument("id", metavar="ID")

    p = command(
        commands,
        "logs",
        cmd_logs,
        "a task's log, fetched from the agent that keeps it (else its stored tail)",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument(
        "--attempt", type=positive_int, metavar="N", help="this attempt (default: the latest)"
    )
    p.add_argument(
        "--follow", "-f", action="store_true", help="keep printing while the attempt runs"
    )

    p = command(
        commands,
        "top",
        cmd_top,
        "a live view of pools, queue depths, throughput, agents and their running tasks",
    )
    p.add_argument("--pool", help="only this pool's agents and tasks")
    p.add_argument("--limit", type=positive_int, default=15, metavar="N", help="recent tasks shown")
    p.add_argument("--interval", type=positive_float, default=1.0, metavar="S", help="refresh")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    return parser


def _subparser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The parser of the command that was run, so usage errors show its usage line."""
    names = [
        args.cmd,
        getattr(args, "pool_command", None),
        getattr(args, "token_command", None),
        getattr(args, "apikey_command", None),
    ]
    current = parser
    for name in filter(None, names):
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                current = action.choices[name]
                break
    return current


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    ctx = Context(getattr(args, "api_url", None))
    handler: Handler = args.handler
    try:
        return handler(args, ctx)
    except UsageError as exc:
        sub = _subparser(parser, args)
        sub.print_usage(sys.stderr)
        sys.stderr.write(f"{sub.prog}: error: {exc}\n")
        return 2
    except RexecError as exc:
        sys.stderr.write(f"rexec: error: {exc.message}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
