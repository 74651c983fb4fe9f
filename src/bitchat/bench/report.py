"""Showing a run: what it measured, its checks, the published targets, the JSON, the plot."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from bitchat.bench.runner import BIN_S, BenchResult


def _cluster(r: BenchResult) -> bool:
    return bool(r.server.get("cluster"))


ROLE_LABELS = {
    "node": "nodes",
    "router": "router",
    "postgres backend": "PostgreSQL backends (the run's database)",
    "postgres (shared)": "PostgreSQL WAL, checkpoints (shared)",
    "redis": "redis-server (shared)",
}


@dataclass(frozen=True)
class Target:
    """A goal for one figure of one scenario (the figures docs/benchmarks.md tracks)."""

    label: str
    get: Callable[[BenchResult], float | None]
    better: str
    """"lower" or "higher"."""
    goal: float
    stretch: float | None = None
    applies: Callable[[BenchResult], bool] = lambda r: True
    digits: int = 2
    """Decimals of the measured value in the table."""

    def met(self, value: float, goal: float) -> bool:
        return value < goal if self.better == "lower" else value >= goal

    def verdict(self, r: BenchResult) -> str | None:
        value = self.get(r)
        if value is None:
            return None
        if self.stretch is not None and self.met(value, self.stretch):
            return "stretch met"
        return "met" if self.met(value, self.goal) else "missed"

    def describe(self) -> str:
        op = "<" if self.better == "lower" else ">="
        text = f"{op} {self.goal:,g}"
        if self.stretch is not None:
            text += f" (stretch {self.stretch:,g})"
        return text


TARGETS: dict[str, list[Target]] = {
    "p2p": [
        Target(
            "server CPU per message (µs)",
            lambda r: r.server_cpu_us_per_msg,
            "lower",
            15,
            10,
            applies=lambda r: not _cluster(r) and r.config.get("window") != 1,
        ),
        Target(
            "CPU per message, every process ÷ standalone",
            lambda r: r.extra.get("cpu_vs_standalone"),
            "lower",
            2,
            applies=_cluster,
        ),
        Target(
            "messages/s across the nodes",
            lambda r: r.delivered_per_s,
            "higher",
            15_000,
            applies=_cluster,
            digits=0,
        ),
        Target(
            "p99 latency, --window 1 (ms)",
            lambda r: r.latency_ms.get("p99"),
            "lower",
            10,
            5,
            applies=lambda r: r.config.get("window") == 1 and not _cluster(r),
            digits=1,
        ),
    ],
    "group": [
        Target(
            "deliveries/s, 100 members",
            lambda r: r.delivered_per_s,
            "higher",
            400_000,
            applies=lambda r: r.config.get("members") == 100,
            digits=0,
        ),
    ],
    "idle": [
        Target(
            "RSS per idle connection (KiB)",
            lambda r: r.extra.get("rss_kib_per_conn"),
            "lower",
            8,
            # A slope: at a few hundred connections the process's own growth (caches,
            # the hash threads' first use) is spread over too few to tell it.
            applies=lambda r: (r.extra.get("connections") or 0) >= 1000,
        ),
        Target(
            "server RSS, 200 users logged in by password (MiB)",
            lambda r: None if r.server_rss_kib is None else r.server_rss_kib / 1024,
            "lower",
            48,
            applies=lambda r: (
                (r.extra.get("login"), r.extra.get("connections")) == ("password", 200)
            ),
            digits=1,
        ),
    ],
    "connect": [],
    "sync": [],
}

EXIT_STATUS_NOTE = (
    "Only a failed check makes the exit status 1. The targets are the project's\n"
    "published goals: a missed target is reported, never a failure."
)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _ms_pair(a: float | None, b: float | None) -> str | None:
    """Two latencies in ms, with fewer decimals as they grow: 0.42 / 0.97, 12.3 / 104.0."""
    if a is None or b is None:
        return None
    low = min(a, b)
    digits = 2 if low < 10 else 1 if low < 1000 else 0
    return f"{_fmt(float(a), digits)} / {_fmt(float(b), digits)}"


def _mib(kib: int | None) -> str | None:
    return None if kib is None else f"{kib / 1024:,.1f}"


def _pair(a: str | None, b: str | None) -> str | None:
    return None if a is None or b is None else f"{a} / {b}"


def heading(r: BenchResult) -> list[str]:
    """The two lines above the tables: what ran, and where."""
    cfg = r.config
    c = {
        k: cfg.get(k)
        for k in (
            "users",
            "members",
            "senders",
            "window",
            "payload",
            "connections",
            "login",
            "devices",
            "messages",
            "group_share",
        )
    }
    secs = f"{cfg.get('duration', r.duration_s):g} s"
    shape = {
        "p2p": f"{c['users']} users in pairs, window {c['window']}, {c['payload']} B, {secs}",
        "group": f"{c['members']} members, {c['senders']} posting, window {c['window']}, "
        f"{c['payload']} B, {secs}",
        "connect": f"{_fmt(c['connections'])} token logins, then "
        f"{_fmt(cfg.get('password_logins'))} password logins"
        if c["login"] == "both"
        else f"{_fmt(c['connections'])} connections, {c['login']} logins",
        "idle": f"{_fmt(c['connections'])} idle connections held for {secs}",
        "sync": f"{c['users']} users x {c['devices']} devices miss {_fmt(c['messages'])} "
        f"messages, {float(c['group_share'] or 0):.0%} in groups",
    }[r.scenario]
    where = "self-started server" if r.server.get("self_started") else "running server"
    if r.server.get("pid"):
        where += f" (pid {r.server['pid']})"
    extra: list[str] = []
    if _cluster(r):
        nodes = r.server.get("nodes", [])
        router = r.server.get("router") or {}
        pids = ", ".join(str(n["pid"]) for n in nodes)
        extra = [
            f"{len(nodes)} nodes (pids {pids}), partners on different nodes",
            f"router (pid {router.get('pid')}) started, answered nodes {router.get('answered')}",
            f"database {r.server.get('database')}, Redis prefix {r.server.get('redis_prefix')}",
        ]
    machine = f"{cfg.get('procs')} load processes, {r.machine.get('nproc')} cores"
    load = r.machine.get("loadavg_at_start")
    if load:
        machine += f", load average {load[0]:g}"
    if extra:  # a cluster: what ran where, then the machine
        return [f"bitchat bench {r.scenario}: {shape}", *extra, machine]
    return [f"bitchat bench {r.scenario}: {shape}", f"{where}; {machine}"]


def _check(value: int) -> str:
    return "[green]ok[/]" if value == 0 else "[bold red]FAIL[/]"


def summary_table(r: BenchResult) -> Table:
    """What was measured, with the correctness checks (any FAIL: exit status 1)."""
    t = Table(box=box.MINIMAL, show_edge=False, pad_edge=False)
    t.add_column("measured", no_wrap=True)
    t.add_column("value", justify="right", no_wrap=True)
    t.add_column("check", no_wrap=True)

    def row(label: str, value: str | None, check: str = "") -> None:
        if value is not None:  # never an empty row: a figure not known is left out
            t.add_row(label, value, check)

    messages = r.scenario in ("p2p", "group")
    sync = r.scenario == "sync"
    kinds: dict[str, Any] = r.extra.get("by_login") or {}
    """connect, both kinds of login: each kind's figures."""
    if sync:
        row(
            "devices caught up",
            _pair(_fmt(r.extra.get("devices_caught_up")), _fmt(r.extra.get("devices"))),
        )
        row("messages missed (stored while offline)", _fmt(r.extra.get("messages_sent")))
        row("deliveries (device, message)", _fmt(r.delivered))
        row("come-back logins", str(r.config.get("login")))
        row("catch-up time, all devices (s)", _fmt(r.duration_s, 3))
        row("deliveries per second", _fmt(r.delivered_per_s, 0))
    elif messages:
        what = "messages delivered" if r.scenario == "p2p" else "deliveries"
        in_window = r.extra.get("delivered_in_window")
        row(f"{what} in the {r.duration_s:g} s of sending", _fmt(in_window))
        row(f"{what} in all, drain included", _fmt(r.delivered))
        row(f"{what} per second (in the {r.duration_s:g} s)", _fmt(r.delivered_per_s, 0))
        again = r.extra.get("redelivered")
        if again:  # only when there were some: a standalone server pushes nothing twice
            row("pushed again, same msg_id (dropped)", _fmt(again))
    elif kinds:
        for kind, k in kinds.items():
            row(f"{kind} logins (measured)", _fmt(k.get("logins")))
            row(f"{kind} logins per second", _fmt(k.get("logins_per_s"), 0))
            kl = k.get("latency_ms") or {}
            row(f"{kind} login latency p50 / p99 (ms)", _ms_pair(kl.get("p50"), kl.get("p99")))
            us = k.get("server_cpu_us_per_login")
            row(f"server CPU per {kind} login (µs)", None if us is None else _fmt(us, 1))
    else:
        row("logins (measured)", _fmt(r.delivered))
        row(
            "logins per second" + (" (set-up)" if r.scenario == "idle" else ""),
            _fmt(r.delivered_per_s, 0),
        )
    lat = {} if kinds else r.latency_ms
    what = "one-way latency" if messages else "device caught up" if sync else "login latency"
    if lat.get("p50") is not None:
        row(f"{what} p50 / p90 (ms)", _ms_pair(lat.get("p50"), lat.get("p90")))
        row(f"{what} p99 / max (ms)", _ms_pair(lat.get("p99"), lat.get("max")))
    per = {
        "p2p": "message",
        "group": "delivery",
        "connect": "login",
        "idle": "login",
        "sync": "delivery",
    }[r.scenario]
    if _cluster(r):
        users = int(r.config.get("users") or 0)
        row(
            "pairs with partners on different nodes",
            _pair(_fmt(r.extra.get("pairs_across_nodes")), _fmt(users // 2)),
        )
        row("CPU per message, every process (µs)", _fmt(r.server_cpu_us_per_msg))
        for role, cost in r.extra.get("cpu_by_role", {}).items():
            row(f"  {ROLE_LABELS.get(role, role)}", _fmt(cost.get("cpu_us_per_msg")))
        ratio = r.extra.get("cpu_vs_standalone")
        if ratio is not None:
            row(
                f"  ÷ standalone ({_fmt(r.extra.get('standalone_cpu_us_per_msg'))} µs)",
                _fmt(ratio),
            )
        row(
            "CPU of every process / load generators' CPU (s)",
            _pair(_fmt(r.server_cpu_s), _fmt(r.client_cpu_s)),
        )
        row("nodes' RSS now (MiB)", _mib(r.server_rss_kib))
    else:
        if r.server_cpu_us_per_msg is not None and not kinds:
            row(f"server CPU per {per} (µs)", _fmt(r.server_cpu_us_per_msg))
        server_cpu = r.server_cpu_s
        if kinds and server_cpu is not None:
            server_cpu = sum(k.get("server_cpu_s") or 0.0 for k in kinds.values())
        if server_cpu is not None:
            row(
                "server CPU / load generators' CPU (s)",
                _pair(_fmt(server_cpu), _fmt(r.client_cpu_s)),
            )
        row(
            "server RSS now / peak (MiB)",
            _pair(_mib(r.server_rss_kib), _mib(r.server_rss_peak_kib)),
        )
    if r.scenario == "idle":
        kib = r.extra.get("rss_kib_per_conn")
        row("server RSS per idle connection (KiB)", None if kib is None else _fmt(kib))
        pct = r.extra.get("idle_cpu_pct")
        row("server CPU while idle (% of a core)", None if pct is None else _fmt(pct))
    if t.rows:
        t.rows[-1].end_section = True  # then the checks
    checks: list[tuple[str, int]] = []
    if sync:
        checks += [
            ("messages lost", r.lost),
            ("messages pushed twice", r.duplicated),
            ("messages out of msg_id order", r.reordered),
            ("messages to a wrong user", int(r.extra.get("unexpected", 0))),
            ("LoginOk.pending wrong", int(r.extra.get("pending_wrong", 0))),
            (
                "acked messages that came again",
                max(
                    int(r.extra.get("pending_after_ack", 0)),
                    int(r.extra.get("pushed_after_ack", 0)),
                ),
            ),
            ("LoginOk.device wrong", int(r.extra.get("device_wrong", 0))),
            ("sends refused", r.send_errors),
            ("sends unanswered", int(r.extra.get("messages_unacked", 0))),
            ("logins failed", int(r.extra.get("login_failures", 0))),
        ]
    elif messages:
        checks += [
            ("messages lost", r.lost),
            ("messages duplicated", r.duplicated),
            ("messages reordered", r.reordered),
            ("sends refused", r.send_errors),
            ("sends unanswered", int(r.extra.get("messages_unacked", 0))),
        ]
    else:
        checks.append(("logins failed", int(r.extra.get("login_failures", 0))))
    checks.append(("connections dropped", r.disconnects))
    for label, value in checks:
        row(label, _fmt(value), _check(value))
    return t


def processes_table(r: BenchResult) -> Table | None:
    """--cluster: the CPU of each counted process over the run (a node's PostgreSQL
    backends on one line; the JSON lists each); None for other runs."""
    procs = r.extra.get("processes")
    if not procs:
        return None
    t = Table(box=box.MINIMAL, show_edge=False, pad_edge=False)
    t.add_column("process", no_wrap=True)
    t.add_column("pid", justify="right", no_wrap=True)
    t.add_column("CPU (s)", justify="right", no_wrap=True)
    t.add_column("µs/message", justify="right", no_wrap=True)
    t.add_column("RSS (MiB)", justify="right", no_wrap=True)
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in procs:
        groups.setdefault(p.get("group") or p["name"], []).append(p)
    per = r.delivered or 0
    for name, members in groups.items():
        cpu = sum(p["cpu_s"] for p in members)
        if len(members) == 1:
            p = members[0]
            label = name + (" (shared)" if p["shared"] and "shared" not in p["role"] else "")
            t.add_row(
                label, str(p["pid"]), _fmt(cpu, 3), _fmt(p["cpu_us_per_msg"]), _mib(p["rss_kib"])
            )
        else:
            us = round(cpu * 1e6 / per, 2) if per else None
            t.add_row(f"{name} ({len(members)})", "-", _fmt(cpu, 3), _fmt(us), "-")
    return t


def targets_table(r: BenchResult) -> Table | None:
    """The published targets that apply to this run, measured against; None if none do."""
    rows = [tg for tg in TARGETS[r.scenario] if tg.applies(r) and tg.get(r) is not None]
    if not rows:
        return None
    t = Table(box=box.MINIMAL, show_edge=False, pad_edge=False)
    t.add_column("target (informational)", no_wrap=True)
    t.add_column("goal", no_wrap=True)
    t.add_column("measured", justify="right", no_wrap=True)
    t.add_column("verdict", no_wrap=True)
    for tg in rows:
        verdict = tg.verdict(r) or "-"
        style = "yellow" if verdict == "missed" else "green"
        value = tg.get(r)
        measured = _fmt(None if value is None else float(value), tg.digits)
        t.add_row(tg.label, tg.describe(), measured, f"[{style}]{verdict}[/]")
    return t


def print_report(r: BenchResult, console: Console) -> None:
    for line in heading(r):
        console.print(line, highlight=False)
    console.print()
    console.print(summary_table(r))
    procs = processes_table(r)
    if procs is not None:
        console.print()
        console.print(procs)
    targets = targets_table(r)
    if targets is not None:
        console.print()
        console.print(targets)
    console.print()
    for note in r.notes:
        console.print(f"[yellow]note: {note}[/]")
    for problem in r.problems:
        console.print(f"[bold red]{problem}[/]")
    if r.ok:
        console.print(
            "[green]every check passed[/]: no message lost, duplicated or reordered (exit status 0)"
            if r.scenario in ("p2p", "group")
            else "[green]every check passed[/]: every device got every message once (exit status 0)"
            if r.scenario == "sync"
            else "[green]every check passed[/]: no login failed, no connection dropped "
            "(exit status 0)",
            highlight=False,
        )
    else:
        console.print("[bold red]a check failed[/] (exit status 1)", highlight=False)
    console.print(EXIT_STATUS_NOTE, style="dim", highlight=False)


def write_json(r: BenchResult, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(r.to_json(), f, indent=2)
        f.write("\n")


def write_plot(r: BenchResult, path: str) -> None:
    """Latency distribution and throughput over time, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'bitchat[plot]'") from exc
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ms = [v / 1000 for v in r.latencies_us]
    if ms:
        ax1.hist(ms, bins=200, color="#3a7bd5")
        ax1.set_yscale("log")
        for name in ("p50", "p99"):
            v = r.latency_ms.get(name)
            if v is not None:
                ax1.axvline(v, color="#d5533a", linestyle="--", linewidth=1)
                ax1.text(v, ax1.get_ylim()[1] * 0.5, f" {name} {v:.2f} ms", color="#d5533a")
    ax1.set_xlabel(
        "one-way latency (ms)"
        if r.scenario in ("p2p", "group")
        else "time until a device had everything (ms)"
        if r.scenario == "sync"
        else "login latency (ms)"
    )
    ax1.set_ylabel("count (log)")
    ax1.set_title("latency distribution")
    if r.timeline:
        xs = [i * BIN_S for i in range(len(r.timeline))]
        ax2.plot(xs, [v / BIN_S for v in r.timeline], color="#2a9d5c")
        ax2.axvline(r.duration_s, color="grey", linestyle=":", linewidth=1)
    ax2.set_xlabel(
        "seconds since the devices came back"
        if r.scenario == "sync"
        else "seconds since the start of sending"
    )
    ax2.set_ylabel(f"{r.unit} per second")
    ax2.set_title("throughput over time")
    fig.suptitle(
        f"bitchat bench {r.scenario}: {r.delivered_per_s:,.0f} {r.unit}/s, "
        f"server {r.server_cpu_us_per_msg} µs CPU each"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
