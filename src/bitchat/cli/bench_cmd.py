"""``bitchat bench``: load a server with one scenario and report what it cost."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bitchat.errors import UsageError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure a server: throughput, latency, loss, CPU and memory",
        description="Start a standalone server (SQLite in a temporary folder, rate limit off) "
        "or target a running one, load it with one scenario from several processes, and "
        "report delivered messages/s, one-way latency, lost/duplicated/reordered messages "
        "(exit status 1 if any), and the server's CPU per message and memory from /proc.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "scenario",
        nargs="?",
        default="p2p",
        choices=["p2p", "group", "connect", "idle"],
        help="p2p: users in pairs; group: one group; connect: logins/s; "
        "idle: memory per idle connection",
    )
    p.add_argument("--users", type=int, default=200, help="p2p: users, in pairs")
    p.add_argument("--members", type=int, default=100, help="group: members")
    p.add_argument("--senders", type=int, default=10, help="group: members that post")
    p.add_argument(
        "--connections",
        "-k",
        type=int,
        default=0,
        help="connect/idle: connections (0: 1000 for connect, 5000 for idle)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=0,
        help="unanswered messages per sender (0: 32 for p2p, 16 for group)",
    )
    p.add_argument("--payload", type=int, default=100, help="bytes of text per message")
    p.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds of sending (p2p, group) or of holding idle connections",
    )
    p.add_argument("--procs", type=int, default=2, help="load-generator processes")
    p.add_argument("--serializer", choices=["json", "msgpack"], default="json")
    p.add_argument(
        "--login",
        choices=["token", "password"],
        default="token",
        help="how the measured logins log in: token (a reconnect) or password "
        "(argon2, slow on purpose)",
    )
    p.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="bench a running server on this machine instead of starting one",
    )
    p.add_argument("--server-pid", type=int, help="with --target: its pid, for CPU and memory")
    p.add_argument(
        "--data-dir",
        help="folder of the self-started server's database "
        "(default: a new temporary folder, removed afterwards)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument(
        "--no-uvloop",
        action="store_true",
        help="run the self-started server on the default asyncio loop",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        help="after sending stops, the longest wait for acks and deliveries",
    )
    p.add_argument(
        "--concurrency", type=int, default=64, help="connections each load generator opens at once"
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra option for the self-started `bitchat server` (repeatable)",
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="record the self-started server with py-spy (speedscope JSON)",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw latency distribution and throughput over time (matplotlib)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from bitchat.bench.report import print_report, write_json, write_plot
    from bitchat.bench.runner import BenchConfig, run_bench

    console = Console()
    err = Console(stderr=True)
    config = BenchConfig(
        scenario=args.scenario,
        users=args.users,
        members=args.members,
        senders=args.senders,
        connections=args.connections,
        window=args.window,
        payload=args.payload,
        duration=args.duration,
        procs=args.procs,
        serializer=args.serializer,
        login=args.login,
        target=args.target,
        server_pid=args.server_pid,
        data_dir=args.data_dir,
        keep=args.keep,
        uvloop=not args.no_uvloop,
        drain_timeout=args.drain_timeout,
        concurrency=args.concurrency,
        server_args=args.server_arg,
        profile=args.profile,
    )
    progress = Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=err,
        disable=args.quiet,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def on_progress(phase: str, done: float, total: float | None, note: str) -> None:
        task = tasks.get(phase)
        if task is None:
            for other in tasks.values():  # a new phase: the earlier ones are over
                t = progress.tasks[other]
                progress.update(other, completed=t.total)
            task = tasks[phase] = progress.add_task(phase, total=total, note=note)
        progress.update(task, completed=done, total=total, note=note)

    try:
        with progress:
            result = run_bench(config, on_progress)
    except UsageError as exc:
        err.print(f"[red]bitchat bench: {exc}[/]")
        return 2
    except RuntimeError as exc:
        err.print(f"[bold red]bitchat bench failed:[/] {exc}")
        return 2
    print_report(result, console)
    if args.json:
        write_json(result, args.json)
        console.print(f"results written to {args.json}")
    if args.plot:
        try:
            write_plot(result, args.plot)
            console.print(f"plot written to {args.plot}")
        except RuntimeError as exc:
            err.print(f"[red]{exc}[/]")
    sys.stdout.flush()
    return 0 if result.ok else 1
