"""Latency over time (PNG): one dot per completed operation, coloured by outcome, with the
fault windows shaded; fail and info operations drawn at the time they were given up."""

from __future__ import annotations

import math
from pathlib import Path

from jepsen_like.history import Op


def latency_plot(
    ops: list[Op], faults: list[tuple[float, float, str]], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for start, stop, name in faults:
        ax.axvspan(start, stop, color="0.85", zorder=0)
        ax.text(start, 1.0, name, transform=ax.get_xaxis_transform(), fontsize=7, va="top")
    colours = {"ok": "tab:blue", "fail": "tab:red", "info": "tab:orange"}
    for kind, colour in colours.items():
        for f, marker in (("read", "."), ("write", "^"), ("add", "^"), ("put", "^")):
            chosen = [op for op in ops if op.type == kind and op.f == f]
            if not chosen:
                continue
            xs = [op.call for op in chosen]
            ys = [(op.ret - op.call) * 1000 if op.ret != math.inf else 5000 for op in chosen]
            ax.scatter(xs, ys, s=6, c=colour, marker=marker, label=f"{f} {kind}")
    ax.set_yscale("log")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
