"""Showing a run: the summary table (with the issue's targets), the JSON file, the plot."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from bitchat.bench.runner import BIN_S, BenchResult


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

    def met(self, value: float, goal: float) -> bool:
        return value < goal if self.better == "lower" else value >= goal

    def verdict(self, r: BenchResult) -> str | None:
        value = self.get(r)
        if value is None:
            return None
        if self.stretch is not None and self.met(value, self.stretch):
            return "stretch met"
        return "met" if self.met(value, self.goal) else "MISSED"

    def describe(self) -> str:
        op = "<" if self.better == "lower" else ">="
        text = f"{op} {self.goal:,g}"
        if self.stretch is not None:
            text += f" (stretch {self.stretch:,g})"
        return text


TARGETS: dict[str, list[Target]] = {
    "p2p": [
        Target("server CPU per message (µs)", lambda r: r.server_cpu_us_per_msg, "lower", 25, 12),
        Target(
            "p99 latency with --window 1 (ms)",
            lambda r: r.latency_ms.get("p99"),
            "lower",
            10,
            applies=lambda r: r.config.get("window") == 1,
        ),
    ],
    "group": [
        Target(
            "deliveries per second, 100 members",
            lambda r: r.delivered_per_s,
            "higher",
            100_000,
            applies=lambda r: r.config.get("members") == 100,
        ),
    ],
    "idle": [
        Target(
            "server RSS per idle connection (KiB)",
            lambda r: r.extra.get("rss_kib_per_conn"),
            "lower",
            16,
            8,
        ),
    ],
    "connect": [],
}


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def summary_table(r: BenchResult) -> Table:
    cfg = r.config
    where = "self-started" if r.server.get("self_started") else "running"
    c = {
        k: cfg.get(k)
        for k in ("users", "members", "senders", "window", "payload", "connections", "login")
    }
    shape = {
        "p2p": f"{c['users']} users in pairs, window {c['window']}, {c['payload']} B",
        "group": f"{c['members']} members, {c['senders']} senders, window {c['window']}, "
        f"{c['payload']} B",
        "connect": f"{c['connections']} connections, {c['login']} login",
        "idle": f"{c['connections']} idle connections",
    }[r.scenario]
    t = Table(
        title=f"bitchat bench {r.scenario}: {shape} ({where} server, "
        f"{cfg['procs']} load processes, {r.machine['nproc']} cores)"
    )
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")
    t.add_column("", justify="left")
    rate_name = {
        "p2p": "delivered messages/s",
        "group": "deliveries/s",
        "connect": "logins/s",
        "idle": "logins/s (set-up)",
    }[r.scenario]
    t.add_row(
        f"{r.unit} delivered" if r.scenario in ("p2p", "group") else "logins",
        _fmt(r.delivered),
        "",
        "",
    )
    t.add_row(rate_name, _fmt(r.delivered_per_s, 0), "", "")
    lat = r.latency_ms
    what = "one-way latency" if r.scenario in ("p2p", "group") else "login latency"
    t.add_row(f"{what} p50 / p90 (ms)", f"{_fmt(lat.get('p50'))} / {_fmt(lat.get('p90'))}", "", "")
    t.add_row(f"{what} p99 / max (ms)", f"{_fmt(lat.get('p99'))} / {_fmt(lat.get('max'))}", "", "")
    if r.scenario in ("p2p", "group"):
        for name, v in (
            ("lost", r.lost),
            ("duplicated", r.duplicated),
            ("reordered", r.reordered),
            ("send errors", r.send_errors),
        ):
            t.add_row(name, _fmt(v), "0", "ok" if v == 0 else f"[bold red]{name.upper()}[/]")
    t.add_row(
        "disconnects",
        _fmt(r.disconnects),
        "0",
        "ok" if r.disconnects == 0 else "[bold red]DISCONNECTS[/]",
    )
    per = {"p2p": "message", "group": "delivery", "connect": "login", "idle": "login"}[r.scenario]
    t.add_row(f"server CPU per {per} (µs)", _fmt(r.server_cpu_us_per_msg), "", "")
    t.add_row(
        "server CPU (s) / load generators' CPU (s)",
        f"{_fmt(r.server_cpu_s)} / {_fmt(r.client_cpu_s)}",
        "",
        "",
    )
    t.add_row(
        "server RSS now / peak (KiB)",
        f"{_fmt(r.server_rss_kib)} / {_fmt(r.server_rss_peak_kib)}",
        "",
        "",
    )
    if r.scenario == "idle":
        t.add_row(
            "server RSS per idle connection (KiB)", _fmt(r.extra.get("rss_kib_per_conn")), "", ""
        )
        t.add_row("server CPU while idle (% of a core)", _fmt(r.extra.get("idle_cpu_pct")), "", "")
    for target in TARGETS[r.scenario]:
        if not target.applies(r):
            continue
        verdict = target.verdict(r)
        style = {"MISSED": "[bold red]MISSED[/]", None: "-"}.get(verdict, f"[green]{verdict}[/]")
        t.add_row(f"[b]target:[/] {target.label}", _fmt(target.get(r)), target.describe(), style)
    return t


def print_report(r: BenchResult, console: Console) -> None:
    console.print(summary_table(r))
    for problem in r.problems:
        console.print(f"[bold red]{problem}[/]")
    if r.ok:
        console.print(
            "[green]no message lost, duplicated or reordered[/]"
            if r.scenario in ("p2p", "group")
            else "[green]no failures[/]"
        )


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
        "one-way latency (ms)" if r.scenario in ("p2p", "group") else "login latency (ms)"
    )
    ax1.set_ylabel("count (log)")
    ax1.set_title("latency distribution")
    if r.timeline:
        xs = [i * BIN_S for i in range(len(r.timeline))]
        ax2.plot(xs, [v / BIN_S for v in r.timeline], color="#2a9d5c")
        ax2.axvline(r.duration_s, color="grey", linestyle=":", linewidth=1)
    ax2.set_xlabel("seconds since the start of sending")
    ax2.set_ylabel(f"{r.unit} per second")
    ax2.set_title("throughput over time")
    fig.suptitle(
        f"bitchat bench {r.scenario}: {r.delivered_per_s:,.0f} {r.unit}/s, "
        f"server {r.server_cpu_us_per_msg} µs CPU each"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
