"""Plots as inline SVG strings (matplotlib, Agg, text kept as escaped SVG text, deterministic ids)."""

from __future__ import annotations

import io

import numpy as np


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "qxc", "font.size": 9,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _svg(fig) -> str:
    plt = _mpl()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": "qxc"})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and doctype: inline SVG
    start, end = text.find("<metadata>"), text.find("</metadata>")
    if start >= 0 and end > start:  # RDF licence metadata: nothing a reader needs
        text = text[:start] + text[end + len("</metadata>"):]
    return text


def bars(labels: list[str], series: dict[str, list[float]], title: str, xlabel: str = "") -> str:
    plt = _mpl()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(7, 0.28 * n + 1.2))
    h = 0.8 / max(1, len(series))
    y = np.arange(n)
    for i, (name, vals) in enumerate(series.items()):
        ax.barh(y + i * h, vals, height=h, label=name)
    ax.set_yticks(y + h * (len(series) - 1) / 2, labels)
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if len(series) > 1:
        ax.legend(loc="lower right")
    return _svg(fig)


def heatmaps(maps: dict[str, np.ndarray], title: str, groups: dict[str, str] | None = None) -> str:
    """Side-by-side maps of an image's per-pixel importance (brighter: more important). Maps of one group (the same
    unit: the original's and the compiled model's permutation importance) share a colour scale."""
    plt = _mpl()
    groups = groups or {}
    top: dict[str, float] = {}
    for name, m in maps.items():
        g = groups.get(name, name)
        top[g] = max(top.get(g, 0.0), float(np.nanmax(m)))
    fig, axes = plt.subplots(1, len(maps), figsize=(3.1 * len(maps), 2.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items()):
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=top[groups.get(name, name)] or 1.0, interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title)
    return _svg(fig)


def layer_sqnr(layers: list[dict], first_jump: str | None) -> str:
    plt = _mpl()
    names = [e["tensor"] for e in layers]
    vals = [float(e["sqnr_db"]) if not isinstance(e["sqnr_db"], str) else np.nan for e in layers]
    capped = [min(v, 120.0) if np.isfinite(v) else 120.0 for v in vals]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(range(len(capped)), capped, marker="o", markersize=3)
    if first_jump in names:
        i = names.index(first_jump)
        ax.axvline(i, color="crimson", linestyle="--")
        ax.annotate(f"first jump: {first_jump}", (i, capped[i]), textcoords="offset points", xytext=(5, 10),
                    color="crimson")
    ax.set_xlabel("tensor (topological order)")
    ax.set_ylabel("SQNR vs reference (dB, capped at 120)")
    ax.set_title("Per-layer error")
    step = max(1, len(names) // 20)
    ax.set_xticks(range(0, len(names), step), [names[i] for i in range(0, len(names), step)], rotation=60,
                  ha="right", fontsize=7)
    return _svg(fig)


def op_histogram(before: dict[str, int], after: dict[str, int]) -> str:
    ops = sorted(set(before) | set(after), key=lambda k: -(before.get(k, 0) + after.get(k, 0)))[:25]
    return bars(ops, {"before": [before.get(o, 0) for o in ops], "after": [after.get(o, 0) for o in ops]},
                "Nodes by op type", "nodes")


def tree_diagram(tree, features: list[str], classifier: bool) -> str:
    plt = _mpl()
    from sklearn.tree import plot_tree

    depth = tree.get_depth()
    fig, ax = plt.subplots(figsize=(min(18, 2.2 * 2**min(depth, 4)), 1.6 * (depth + 1)))
    plot_tree(tree, feature_names=list(features), filled=True, impurity=False, proportion=True, ax=ax, fontsize=7,
              rounded=True)
    return _svg(fig)
