"""``bitchat bench``: load a server with one scenario and report what it cost."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bitchat.errors import UsageError

DESCRIPTION = """\
Load a bitchat server with one scenario from several processes and report
what it measured: delivered messages/s, one-way latency, lost, duplicated or
reordered messages (every message is checked), and the server's CPU per
message and memory, read from /proc. By default the bench starts its own
standalone server (SQLite in a temporary folder, rate limit off); --target
HOST:PORT --server-pid PID benches one already running on this machine.

scenarios:
  p2p      users in pairs, each sending to its partner (default); with
           --cluster N, on N nodes and a router, partners on different nodes
  group    one group: some members post, every other member receives
  connect  connections that log in as fast as they can: logins/s, token
           logins and password logins measured apart (--login picks one)
  idle     logged-in connections that only heartbeat: memory per connection
  sync     users with several devices miss messages while offline, then every
           device comes back at once: catch-up time, CPU per delivery, and
           every message on every device exactly once
"""

EPILOG = """\
exit status:
  0  every check passed, whether or not the targets were met
  1  a correctness check failed: a message lost, duplicated or reordered, a
     send refused or unanswered, a login failed or a connection dropped (sync:
     also a message to the wrong user, a wrong LoginOk.pending or .device)
  2  the bench could not run (bad option, the server did not start or died)

The table's "target" column gives the project's published goals (see
docs/benchmarks.md); a missed target is reported, never an error.

examples:
  bitchat bench p2p --duration 3
  bitchat bench group --members 20
  bitchat bench connect -k 200
  bitchat bench idle -k 1000
  bitchat bench sync --users 50 --devices 2 --messages 5000
  bitchat bench p2p --json p2p.json --plot p2p.png
  bitchat bench p2p --target 127.0.0.1:8864 --server-pid 1234
  bitchat bench p2p --cluster 2 --duration 3
  bitchat bench p2p --json alone.json
  bitchat bench p2p --cluster 2 --baseline alone.json
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure a server: throughput, latency, loss, CPU and memory",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenario",
        nargs="?",
        default="p2p",
        choices=["p2p", "group", "connect", "idle", "sync"],
        help="what to measure (default p2p; see scenarios above)",
    )
    load = p.add_argument_group("load")
    load.add_argument(
        "--users",
        type=int,
        default=0,
        metavar="N",
        help="p2p: users, in pairs; sync: users whose devices catch up "
        "(default 200 for p2p, 50 for sync)",
    )
    load.add_argument(
        "--members", type=int, default=100, metavar="N", help="group: members (default 100)"
    )
    load.add_argument(
        "--senders",
        type=int,
        default=10,
        metavar="N",
        help="group: members that post; sync: other users who send the missed messages "
        "(default 10)",
    )
    load.add_argument(
        "--devices",
        type=int,
        default=2,
        metavar="N",
        help="sync: devices per user, each with its own device id (default 2)",
    )
    load.add_argument(
        "--messages",
        type=int,
        default=5000,
        metavar="N",
        help="sync: messages sent in all while the devices are offline (default 5000)",
    )
    load.add_argument(
        "--group-share",
        type=float,
        default=0.2,
        metavar="FRACTION",
        help="sync: the share of the messages sent to groups, 0 to 1; each sender "
        "owns a group of every --senders-th user (default 0.2)",
    )
    load.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="sync: the longest wait for the sending, then for the catch-up (default 60)",
    )
    load.add_argument(
        "--connections",
        "-k",
        type=int,
        default=0,
        metavar="N",
        help="connect, idle: connections to open (default 1000 for connect, 5000 for idle)",
    )
    load.add_argument(
        "--window",
        type=int,
        default=0,
        metavar="N",
        help="p2p, group, sync: unanswered messages per sender "
        "(default 32 for p2p and sync, 16 for group)",
    )
    load.add_argument(
        "--payload",
        type=int,
        default=100,
        metavar="BYTES",
        help="p2p, group, sync: bytes of text per message (default 100)",
    )
    load.add_argument(
        "--duration",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="p2p, group: seconds of sending; idle: seconds of holding the connections "
        "(default 10)",
    )
    load.add_argument(
        "--procs", type=int, default=2, metavar="N", help="load-generator processes (default 2)"
    )
    load.add_argument(
        "--serializer",
        choices=["json", "msgpack"],
        default="json",
        help="body encoding the load generators use (default json)",
    )
    load.add_argument(
        "--login",
        choices=["token", "password"],
        default="",
        help="how the measured logins log in: token (a reconnect) or password "
        "(argon2, slow on purpose); by default connect measures both, token logins "
        "then password logins, reported apart, and the other scenarios use token",
    )
    load.add_argument(
        "--password-logins",
        type=int,
        default=0,
        metavar="N",
        help="connect measuring both kinds: password logins after the token ones "
        "(default a fifth of --connections)",
    )
    load.add_argument(
        "--concurrency",
        type=int,
        default=64,
        metavar="N",
        help="connections each load generator opens at once (default 64)",
    )
    load.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="after sending stops, the longest wait for acks, then for deliveries (default 5)",
    )
    server = p.add_argument_group("server under test")
    server.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="bench a server already running on this machine instead of starting one",
    )
    server.add_argument(
        "--server-pid",
        type=int,
        metavar="PID",
        help="with --target: the server's process id, to read its CPU and memory "
        "(without it they are not reported)",
    )
    server.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder of the self-started server's database (--cluster: of the nodes' "
        "and the router's logs) (default a new temporary folder, removed afterwards)",
    )
    server.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder (database and server.log) afterwards; "
        "--cluster: the run's PostgreSQL database and the logs",
    )
    server.add_argument(
        "--no-uvloop",
        action="store_true",
        help="run the self-started server on the default asyncio loop (default uvloop)",
    )
    server.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more option for the self-started `bitchat server`, e.g. "
        "--server-arg=--workers=4; repeat for more (not --host or --port: the server "
        "listens on a free loopback port)",
    )
    server.add_argument(
        "--profile",
        metavar="FILE",
        help="record the self-started server with py-spy: FILE.txt collapsed stacks, "
        "any other name speedscope JSON",
    )
    cluster = p.add_argument_group("cluster (p2p)")
    cluster.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="start N >= 2 PostgreSQL-backed nodes and a router on this machine instead of "
        "a standalone server; the two users of a pair log in on different nodes, so every "
        "message crosses nodes; reports the CPU of every process involved",
    )
    cluster.add_argument(
        "--pg",
        metavar="URL",
        help="with --cluster: the PostgreSQL server, as a URL whose user may create "
        "databases (the run's own, bitchat_bench_<random>, dropped afterwards unless "
        "--keep) (default $BITCHAT_BENCH_PG or postgresql://postgres@127.0.0.1:5432/postgres)",
    )
    cluster.add_argument(
        "--redis",
        metavar="URL",
        help="with --cluster: the Redis server (the run's keys have their own prefix, "
        "deleted afterwards) (default $BITCHAT_BENCH_REDIS or redis://127.0.0.1:6379/0)",
    )
    cluster.add_argument(
        "--baseline",
        metavar="FILE",
        help="with --cluster: the --json of a standalone bench p2p run on this machine, "
        "whose server CPU per message the cluster's is compared with (by default the "
        "standalone target, 15 µs)",
    )
    output = p.add_argument_group("output")
    output.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    output.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the latency distribution and throughput over time (needs matplotlib)",
    )
    output.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
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
        devices=args.devices,
        messages=args.messages,
        group_share=args.group_share,
        timeout=args.timeout,
        connections=args.connections,
        window=args.window,
        payload=args.payload,
        duration=args.duration,
        procs=args.procs,
        serializer=args.serializer,
        login=args.login,
        password_logins=args.password_logins,
        target=args.target,
        server_pid=args.server_pid,
        data_dir=args.data_dir,
        keep=args.keep,
        uvloop=not args.no_uvloop,
        drain_timeout=args.drain_timeout,
        concurrency=args.concurrency,
        server_args=args.server_arg,
        profile=args.profile,
        cluster=args.cluster,
        pg=args.pg,
        redis=args.redis,
        baseline=args.baseline,
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
