"""``bitchat bench``: load a server and measure what it costs.

Scenarios (p2p, group, connect, idle), the load generator processes, the
reading of the server's CPU and memory from ``/proc``, and the report. Run it
as ``bitchat bench p2p``; from a program::

    from bitchat.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig("p2p", users=20, duration=2))
    assert result.ok, result.problems
"""

from bitchat.bench.runner import SCENARIOS, BenchConfig, BenchResult, run_bench

__all__ = ["SCENARIOS", "BenchConfig", "BenchResult", "run_bench"]
