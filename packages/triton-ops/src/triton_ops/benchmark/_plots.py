"""PNG plots of speed against size (matplotlib, imported only when plotting)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ._model import CaseResult


def pyplot():
    """matplotlib's pyplot on the headless Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_results(results: Sequence[CaseResult], path: Path, title: str | None = None) -> Path | None:
    """One panel per (group, panel): GB/s or TFLOP/s of every implementation against size, with the copy of the
    same bytes as the ceiling on bandwidth panels. Returns None when matplotlib is missing or nothing was timed."""
    plt = pyplot()
    if plt is None:
        return None
    panels: dict[tuple[str, str], list[CaseResult]] = {}
    for r in results:
        if r.x is not None and any(i.timing is not None for i in r.impls):
            panels.setdefault((r.group, r.panel), []).append(r)
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax, ((group, panel), cases) in zip(axes.flat, panels.items()):
        metric = cases[0].metric
        series: dict[str, list[tuple[float, float]]] = {}
        roles: dict[str, str] = {}
        for c in cases:
            for r in c.impls:
                y = r.gbps if metric == "gbps" else r.tflops
                if y is None or r.timing is None:
                    continue
                key = f"{r.name} ({c.dtype})" if len({cc.dtype for cc in cases}) > 1 else r.name
                series.setdefault(key, []).append((c.x, y))
                roles[key] = r.role
            if metric == "gbps" and c.copy_same_gbps:
                key = "copy, same bytes" + (f" ({c.dtype})" if len({cc.dtype for cc in cases}) > 1 else "")
                series.setdefault(key, []).append((c.x, c.copy_same_gbps))
                roles[key] = "ceiling"
        for key, pts in series.items():
            pts = _reduce(pts)
            xs, ys = zip(*pts)
            style = {"ours": dict(lw=2.2, marker="o"), "baseline": dict(lw=1.2, marker=".", ls="--"),
                     "ceiling": dict(lw=1.0, color="gray", ls=":", marker="")}[roles.get(key, "baseline")]
            ax.plot(xs, ys, label=key, **style)
        ax.set_xscale("log")
        ax.set_xlabel(cases[0].x_label)
        ax.set_ylabel("GB/s (read + written)" if metric == "gbps" else "TFLOP/s")
        ax.set_title(f"{group}: {panel}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    # (a top margin of half an inch for the title: tight_layout alone lets it overlap the first row's titles)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()) if title else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _reduce(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted by x; several cases at one x (e.g. shapes of equal size) are averaged into one point."""
    acc: dict[float, list[float]] = {}
    for x, y in pts:
        acc.setdefault(x, []).append(y)
    return sorted((x, sum(v) / len(v)) for x, v in acc.items())
