"""`make demo`: the whole OpenMarketSim stack, four processes, one command.

Starts the exchange, the market-data relay and the bot battle, with the terminal
monitor in the foreground (when there is a terminal), for ``--duration`` seconds or
until Ctrl-C; then stops everything cleanly, writes the HTML report and points at the
run's files. Each server's log goes to a file in the run's data directory.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

from launcher import (
    ROOT,
    ServerProcess,
    python_env,
    run_event_loop,
    start_server,
    stop_on_signals,
    stop_process,
)

DEFAULT_PORTS = {"gateway": 9001, "events": 9002, "feed": 9010}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the whole OpenMarketSim stack: exchange, relay, bots, monitor.")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds the battle runs (default 60)")
    parser.add_argument("--seed", type=int, default=42, help="seed for every bot (default 42)")
    parser.add_argument("--config", type=Path, default=None,
                        help="exchange config JSON (default: built-in)")
    parser.add_argument("--bots-config", type=Path, default=ROOT / "bots_config.json",
                        help="bot battle config (default bots_config.json)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the run's CSVs, logs and report go "
                             "(default runs/<UTC time>)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    parser.add_argument("--free-ports", action="store_true",
                        help="let the OS pick free ports instead of 9001/9002/9010")
    parser.add_argument("--no-monitor", action="store_true",
                        help="do not start the terminal monitor (implied without a terminal)")
    return parser.parse_args(argv)


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data_dir: Path = args.data_dir or ROOT / "runs" / time.strftime(
            "%Y%m%d-%H%M%S", time.gmtime())
        self.servers: list[ServerProcess] = []
        self.children: list[asyncio.subprocess.Process] = []
        self.logs: list[object] = []

    def _port(self, name: str) -> str:
        return "0" if self.args.free_ports else str(DEFAULT_PORTS[name])

    def _log(self, name: str):  # type: ignore[no-untyped-def]
        handle = open(self.data_dir / f"{name}.log", "a", encoding="utf-8")  # noqa: SIM115
        self.logs.append(handle)
        return handle

    async def start_servers(self) -> tuple[ServerProcess, ServerProcess]:
        exchange_args = ["--host", self.args.host, "--port", self._port("gateway"),
                         "--events-port", self._port("events"),
                         "--data-dir", str(self.data_dir)]
        if self.args.config:
            exchange_args += ["--config", str(self.args.config)]
        exchange = await start_server("exchange_server.py", *exchange_args,
                                      log=self._log("exchange"))
        self.servers.append(exchange)
        relay = await start_server("market_data_server.py", "--host", self.args.host,
                                   "--port", self._port("feed"),
                                   "--exchange-uri", exchange.uris["events"],
                                   log=self._log("relay"))
        self.servers.append(relay)
        return exchange, relay

    async def start_child(self, script: str, *args: str, foreground: bool = False,
                          log_name: str | None = None) -> asyncio.subprocess.Process:
        out = None if foreground or log_name is None else self._log(log_name)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / script), *args, cwd=ROOT, env=python_env(),
            stdout=out, stderr=out, stdin=None if foreground else asyncio.subprocess.DEVNULL)
        self.children.append(proc)
        return proc

    async def run(self) -> int:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        print(f"OpenMarketSim demo: data in {self.data_dir}", flush=True)
        runner: asyncio.subprocess.Process | None = None
        try:
            runner = await self.battle()
        finally:
            code = await self.shutdown(runner)
        return code

    async def battle(self) -> asyncio.subprocess.Process:
        """Start everything and wait until the battle ends, the monitor quits or Ctrl-C."""
        exchange, relay = await self.start_servers()
        gateway, feed = exchange.uris["gateway"], relay.uris["feed"]
        print(f"  exchange gateway {gateway}, event stream {exchange.uris['events']}")
        print(f"  market data feed {feed}", flush=True)
        with_monitor = not self.args.no_monitor and sys.stdin.isatty() and sys.stdout.isatty()
        runner = await self.start_child(
            "bot_battle_runner.py", "--config", str(self.args.bots_config),
            "--duration", str(self.args.duration), "--seed", str(self.args.seed),
            "--exchange-uri", gateway, "--market-data-uri", feed,
            log_name="bots" if with_monitor else None)
        waiters = {asyncio.ensure_future(runner.wait())}
        if with_monitor:
            monitor = await self.start_child("monitor_client.py", "--uri", feed, foreground=True)
            waiters.add(asyncio.ensure_future(monitor.wait()))
        stop = asyncio.Event()
        stop_on_signals(stop)
        waiters.add(asyncio.ensure_future(stop.wait()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        return runner

    async def shutdown(self, runner: asyncio.subprocess.Process | None) -> int:
        # Bots first (they cancel their orders), then the relay, then the exchange, which
        # writes its final performance rows on SIGTERM.
        for child in reversed(self.children):
            await stop_process(child, signal.SIGINT)
        for server in reversed(self.servers):
            await server.stop()
        for handle in self.logs:
            handle.close()  # type: ignore[attr-defined]
        if runner is None:
            return 1  # the stack never started: main() reports why, there is no run to show
        report = self.write_report()
        self.print_leaderboard()
        print("\nRun finished.")
        print(f"  trades:      {self.data_dir / 'trades.csv'}")
        print(f"  performance: {self.data_dir / 'performance.csv'}")
        if report:
            print(f"  report:      {report}")
        print(f"  logs:        {self.data_dir}/*.log", flush=True)
        return 0 if runner is not None and runner.returncode in (0, -signal.SIGINT) else 1

    def print_leaderboard(self) -> None:
        """With the monitor in the foreground the battle's output went to bots.log:
        show its final leaderboard now that the terminal is free."""
        log = self.data_dir / "bots.log"
        if not log.exists():
            return
        text = log.read_text(encoding="utf-8", errors="replace")
        start = text.rfind("Final leaderboard")
        if start >= 0:
            print("\n" + text[start:].rstrip())

    def write_report(self) -> Path | None:
        try:
            from report import build_report
            return build_report(self.data_dir)
        except Exception as exc:  # the run's files matter more than the report
            print(f"  (no report: {exc})", file=sys.stderr)
            return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_event_loop(Demo(args).run())
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        if not args.free_ports:
            print("demo: if a port is in use, add --free-ports "
                  "(make demo DEMO_ARGS=--free-ports)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
