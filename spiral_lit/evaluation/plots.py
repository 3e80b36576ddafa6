"""Tables and figures of ``spiral_lit.evaluation.compare``: accuracy-vs-compute curves from evaluation means.

:func:`curve_rows` turns the metric means of each checkpoint (names as in :mod:`spiral_lit.evaluation.held_out`,
e.g. ``search/maj@4``, ``rsa/tokens@2``) into one row per (checkpoint, scaffold, x): x is the token
budget (sequential), k (majority vote, pass@k) or the round (RSA). The figure functions draw those
rows with matplotlib's object API (Agg backend, no pyplot state), one colour per checkpoint.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402 - the backend is chosen first
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

_KEY = re.compile(r"^(sequential|search|rsa)/(\w+)@(\d+)$")
# scaffold -> (metric prefix, accuracy metric, whether prompt_tokens is logged per x like tokens@x)
_CURVES = {
    "sequential": ("sequential", "accuracy", True),
    "majority": ("search", "maj", False),
    "pass@k": ("search", "pass", False),
    "rsa": ("rsa", "accuracy", True),
    "rsa_majority": ("rsa", "majority", True),
}
_LineStyle = Literal["-", "--", ":", "-."]
_STYLE: dict[str, tuple[str, _LineStyle]] = {
    "sequential": ("o", "-"),
    "majority": ("s", "--"),
    "rsa": ("^", ":"),
    "rsa_majority": ("v", "-."),
}
_LABEL = {
    "sequential": "sequential (budget)",
    "majority": "majority vote (k)",
    "rsa": "RSA (round)",
    "rsa_majority": "RSA majority (round)",
}


def curve_rows(metrics: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Rows ``{checkpoint, scaffold, x, accuracy, tokens, prompt_tokens}`` from ``{checkpoint: {metric: mean}}``."""
    rows = []
    for checkpoint, values in metrics.items():
        xs: dict[str, set[int]] = {}
        for key in values:
            if match := _KEY.match(key):
                xs.setdefault(f"{match[1]}/{match[2]}", set()).add(int(match[3]))
        for scaffold, (prefix, accuracy, per_x) in _CURVES.items():
            for x in sorted(xs.get(f"{prefix}/{accuracy}", ())):
                prompt_key = f"{prefix}/prompt_tokens@{x}" if per_x else f"{prefix}/prompt_tokens"
                rows.append(
                    {
                        "checkpoint": checkpoint,
                        "scaffold": scaffold,
                        "x": x,
                        "accuracy": values[f"{prefix}/{accuracy}@{x}"],
                        "tokens": values.get(f"{prefix}/tokens@{x}"),
                        "prompt_tokens": values.get(prompt_key),
                    }
                )
    return rows


def _select(rows: list[dict[str, Any]], scaffold: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of one scaffold grouped by checkpoint, sorted by x."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["x"]):
        if row["scaffold"] == scaffold:
            out.setdefault(row["checkpoint"], []).append(row)
    return out


def _axes(title: str, xlabel: str, ylabel: str = "accuracy") -> tuple[Figure, Any]:
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return figure, ax


def _finish(ax: Any, drew: bool) -> None:
    if drew:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "not measured (see the eval section)", ha="center", va="center", transform=ax.transAxes)


def _colours(rows: list[dict[str, Any]]) -> dict[str, str]:
    names = list(dict.fromkeys(r["checkpoint"] for r in rows))
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def accuracy_vs_tokens(rows: list[dict[str, Any]]) -> Figure:
    """Accuracy against generated tokens per problem: sequential budgets, majority vote over k, RSA rounds."""
    figure, ax = _axes("Accuracy vs generated tokens per problem", "generated tokens per problem")
    figure.set_figwidth(8.4)
    colours, drawn = _colours(rows), []
    for scaffold in ("sequential", "majority", "rsa", "rsa_majority"):
        marker, line = _STYLE[scaffold]
        for checkpoint, points in _select(rows, scaffold).items():
            points = [p for p in points if p["tokens"] is not None]
            ax.plot([p["tokens"] for p in points], [p["accuracy"] for p in points], marker=marker, linestyle=line,
                    color=colours[checkpoint])  # fmt: skip
            drawn.append(scaffold)
    if not drawn:
        _finish(ax, False)
        return figure
    ax.set_xscale("log", base=2)
    # Two small legends beside the axes: colour = checkpoint, marker and line = scaffold.
    checkpoints = [Line2D([], [], color=c, linewidth=3) for c in colours.values()]
    figure.legend(checkpoints, list(colours), loc="outside right upper", fontsize="small", title="checkpoint")
    scaffolds = list(dict.fromkeys(drawn))
    styles = [Line2D([], [], color="0.3", marker=_STYLE[s][0], linestyle=_STYLE[s][1]) for s in scaffolds]
    figure.legend(styles, [_LABEL[s] for s in scaffolds], loc="outside right lower", fontsize="small", title="scaffold")
    return figure


def pass_at_k(rows: list[dict[str, Any]]) -> Figure:
    """Unbiased pass@k against k."""
    figure, ax = _axes("pass@k", "k (samples)", "pass@k")
    colours, curves = _colours(rows), _select(rows, "pass@k")
    for checkpoint, points in curves.items():
        ax.plot([p["x"] for p in points], [p["accuracy"] for p in points], marker="o", color=colours[checkpoint],
                label=checkpoint)  # fmt: skip
    if curves:
        ax.set_xscale("log", base=2)
    _finish(ax, bool(curves))
    return figure


def rsa_rounds(rows: list[dict[str, Any]]) -> Figure:
    """RSA population accuracy (solid) and its majority vote (dashed) after each round; round 0 = the search traces."""
    figure, ax = _axes("Recursive self-aggregation", "round")
    colours, drew = _colours(rows), False
    for scaffold, line, what in (("rsa", "-", "mean accuracy"), ("rsa_majority", "--", "majority vote")):
        for checkpoint, points in _select(rows, scaffold).items():
            ax.plot([p["x"] for p in points], [p["accuracy"] for p in points], marker="o", linestyle=line,
                    color=colours[checkpoint], label=f"{checkpoint}: {what}")  # fmt: skip
            drew = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(ax, drew)
    return figure


FIGURES = {"accuracy_vs_tokens": accuracy_vs_tokens, "pass_at_k": pass_at_k, "rsa_rounds": rsa_rounds}
"""Figure name (PNG file and TensorBoard tag) -> function of the curve rows."""
