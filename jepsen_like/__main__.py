"""``python -m jepsen_like run|suite|cleanup`` (run from the repository root, as root for
network namespaces). Exit code 0 only when every checker passed (or failed as expected)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from jepsen_like import hosts, suite
from jepsen_like.runner import Spec, run


def _line(number: Any, result: dict[str, Any]) -> str:
    checks = result.get("checks", {})
    bad = [
        name
        for name, c in checks.items()
        if isinstance(c, dict) and "passed" in c and not c["passed"]
    ]
    state = "PASS" if result.get("valid") else "FAIL"
    why = result.get("error") or ", ".join(bad) or "; ".join(result.get("nemesis_errors", []))
    return f"{number:>3} {state} {result['spec']['name'] if 'spec' in result else ''} {why}"


@click.group()
def main() -> None:
    """Fault-injection tests of an LLM-Cache Raft group."""


@main.command("run")
@click.option("--nodes", default=3, show_default=True)
@click.option("--nemesis", "nemeses", multiple=True, help="Repeatable; none = no faults.")
@click.option(
    "--schedule", type=click.Choice(["single", "alternating", "random"]), default="single"
)
@click.option("--workload", type=click.Choice(["register", "set", "cache"]), default="register")
@click.option(
    "--consistency", type=click.Choice(["stale", "leader", "linearizable"]), default="linearizable"
)
@click.option("--time-limit", default=30.0, show_default=True)
@click.option("--seed", default=7, show_default=True)
@click.option("--clients", default=6, show_default=True)
@click.option("--stale-bound", type=float, default=None, help="Max staleness of a read (s).")
@click.option("--max-write-gap", type=float, default=None, help="Max gap between acked writes (s).")
@click.option(
    "--hosts", "hosts_kind", type=click.Choice(["auto", "netns", "loopback"]), default="auto"
)
@click.option("--store", type=click.Path(path_type=Path), default=Path("store"))
@click.option("--name", default=None, help="Test name (default from the options).")
def run_cmd(
    nodes: int,
    nemeses: tuple[str, ...],
    schedule: str,
    workload: str,
    consistency: str,
    time_limit: float,
    seed: int,
    clients: int,
    stale_bound: float | None,
    max_write_gap: float | None,
    hosts_kind: str,
    store: Path,
    name: str | None,
) -> None:
    """One test; writes store/<test>/<time>/ (history, node logs, latency.png, results.json)."""
    spec = Spec(
        name=name or f"{workload}-{'+'.join(nemeses) or 'none'}-{consistency}",
        nodes=nodes,
        nemesis=list(nemeses),
        schedule=schedule,
        workload=workload,
        consistency=consistency,
        time_limit=time_limit,
        seed=seed,
        clients=clients,
        stale_bound_s=stale_bound,
        max_write_gap_s=max_write_gap,
        hosts=hosts_kind,
    )
    try:
        result = run(spec, store)
    except hosts.Unsupported as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result.get("checks", {}), indent=2, default=str)[:20000])
    click.echo(_line("", result) + f"  ({result['dir']})")
    sys.exit(0 if result["valid"] else 1)


@main.command("suite")
@click.option("--short", "short_form", is_flag=True, help="CI form: items 1, 3, 4, 6.")
@click.option("--only", multiple=True, type=int, help="Run only these items (repeatable).")
@click.option("--time-limit", default=40.0, show_default=True)
@click.option(
    "--hosts", "hosts_kind", type=click.Choice(["auto", "netns", "loopback"]), default="auto"
)
@click.option("--store", type=click.Path(path_type=Path), default=Path("store"))
def suite_cmd(
    short_form: bool, only: tuple[int, ...], time_limit: float, hosts_kind: str, store: Path
) -> None:
    """The standard suite; a summary in store/suite-<time>.json."""
    specs = suite.short() if short_form else suite.standard(time_limit)
    chosen = set(only) or set(specs) | ({12} if not short_form else set())
    summary: dict[str, Any] = {}
    for number, spec in sorted(specs.items()):
        if number not in chosen:
            continue
        spec.hosts = hosts_kind
        try:
            result = run(spec, store)
        except hosts.Unsupported as exc:
            result = {"valid": False, "error": f"unsupported: {exc}", "spec": {"name": spec.name}}
        except Exception as exc:  # one broken item must not hide the others
            result = {
                "valid": False,
                "error": f"{type(exc).__name__}: {exc}",
                "spec": {"name": spec.name},
            }
        summary[str(number)] = _brief(result)
        click.echo(_line(number, result), err=False)
    if 12 in chosen:
        result = suite.bad_config()
        summary["12"] = result
        click.echo(
            f" 12 {'PASS' if result['valid'] else 'FAIL'} 12-bad-config: {result['message'][-120:]}"
        )
    store.mkdir(parents=True, exist_ok=True)
    path = store / f"suite-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    click.echo(f"summary: {path}")
    passed = sum(1 for r in summary.values() if r["valid"])
    failed = len(summary) - passed
    click.echo(f"suite: {passed} passed, {failed} failed")  # the plain closing line CI reads
    sys.exit(0 if failed == 0 else 1)


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    checks = result.get("checks", {})
    return {
        "valid": result.get("valid"),
        "dir": result.get("dir"),
        "hosts": result.get("hosts"),
        "error": result.get("error"),
        "nemesis_errors": result.get("nemesis_errors"),
        "checks": {
            name: {k: v for k, v in c.items() if k != "digests" and k != "states"}
            for name, c in checks.items()
            if isinstance(c, dict)
        },
    }


KEY_FIGURES = {
    "linearizable": ("non_linearizable_keys",),
    "stale_reads": ("stale_reads", "max_staleness_s", "bound_s"),
    "set": ("acknowledged", "unknown_outcome", "lost_count", "duplicated"),
    "cache": ("puts", "nodes_disagree", "expired_but_present", "ttl_probe"),
    "availability": ("max_write_gap_s", "failover_s"),
    "convergence": ("applied_index",),
    "configuration": ("members",),
    "victims_logged": ("found",),
}


@main.command("report")
@click.argument("summary", type=click.Path(exists=True, path_type=Path))
def report_cmd(summary: Path) -> None:
    """A Markdown table of a suite summary (store/suite-<time>.json)."""
    data = json.loads(summary.read_text())
    click.echo("| item | result | checks (key figures) |\n| --- | --- | --- |")
    for number, item in data.items():
        if "checks" not in item:  # item 12
            click.echo(
                f"| {number} | {'PASS' if item['valid'] else 'FAIL'} | {item['message'][-90:]} |"
            )
            continue
        figures = []
        for name, check in item["checks"].items():
            if name in KEY_FIGURES:
                if name == "availability":
                    check = check | {"failover_s": [f["next_ack_s"] for f in check["failover"]]}
                shown = {k: check.get(k) for k in KEY_FIGURES[name] if k in check}
                mark = "" if check.get("passed", True) else " **FAILED**"
                expected = " (expected invalid)" if check.get("expected") == "invalid" else ""
                figures.append(f"{name}{expected}{mark}: {json.dumps(shown, default=str)}")
        result = "PASS" if item["valid"] else f"FAIL {item.get('error') or ''}"
        name = Path(str(item.get("dir") or "")).parent.name
        cell = "<br>".join(figures).replace("|", "/")
        click.echo(f"| {number} {name} | {result} | {cell} |")


@main.command("cleanup")
@click.option("--prefix", default=hosts.PREFIX, show_default=True)
def cleanup_cmd(prefix: str) -> None:
    """Remove namespaces and links left by crashed runs (names starting with the prefix)."""
    removed = hosts.cleanup(prefix)
    click.echo("\n".join(removed) or "nothing to remove")


if __name__ == "__main__":
    main()
