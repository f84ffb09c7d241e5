"""A run's pictures, drawn by rank zero from metrics.jsonl when the run ends (stopped or failed too): the loss
curves with the learning rate, the recipe's metrics, and for a recipe that classifies the test split's confusion
matrix and per-class precision, recall and F1; and --find-lr's curve.

matplotlib's Figure without pyplot: no global figure state, no display, nothing kept open.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

SCORES = ("precision", "recall", "f1", "support")  # per class, as per_class gives them
ANNOTATED = 20  # up to this many classes the confusion matrix shows its counts


def draw(folder: Path, records: list[dict], best: dict | None, title: str) -> list[Path]:
    """Every picture the records (metrics.jsonl's) allow, into `folder`; the paths written. `best`: summary.json's."""
    figures = {"curves": curves(records, best, title), "metrics": metrics(records, title)}
    classes = next((r for r in reversed(records) if r.get("event") == "classes"), None)
    if classes:
        figures["confusion"] = confusion(classes, title)
        figures["classes"] = class_bars(classes, title)
    written = []
    for name, fig in figures.items():
        if fig is not None:
            written.append(save(fig, folder / f"{name}.png"))
    return written


def save(fig: Figure, path: Path) -> Path:
    """Whole or not at all: a process stopped while it draws leaves no half picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_name(path.name + ".tmp"), format="png")
    os.replace(path.with_name(path.name + ".tmp"), path)
    return path


def draw_run(run_dir: Path, best: dict | None, title: str) -> list[Path]:
    """A run's pictures from its metrics.jsonl, into RUN_DIR/pictures."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return draw(run_dir / "pictures", records, best, title)


def series(records: list[dict], key: str) -> tuple[list, list]:
    steps, values = [], []
    for r in records:
        if isinstance(r.get(key), (int, float)) and "event" not in r:
            steps.append(r["step"])
            values.append(r[key])
    return steps, values


def tested(records: list[dict], key: str) -> tuple[list, list]:
    """The test split's last value of `key`, at the step whose weights gave it (the best checkpoint's, say)."""
    steps, values = series(records, key)
    weights = next((r["weights_step"] for r in reversed(records) if r.get("event") == "test"), None)
    return ([steps[-1] if weights is None else weights], values[-1:]) if values else ([], [])


def curves(records: list[dict], best: dict | None, title: str) -> Figure | None:
    """Training and validation loss over the steps, the best checkpoint marked, with the learning rate below."""
    train, val, lr = series(records, "train/loss"), series(records, "val/loss"), series(records, "lr")
    if not train[0] and not val[0]:
        return None
    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    loss, rate = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    loss.plot(*train, color="C0", linewidth=1.2, label="train")
    if val[0]:
        loss.plot(*val, color="C1", marker="o", markersize=3, linewidth=1.5, label="validation")
    test = tested(records, "test/loss")
    if test[0]:
        loss.scatter(*test, color="C3", marker="*", s=120, zorder=3, label="test")
    if best:
        loss.axvline(best["step"], color="0.6", linestyle="--", linewidth=1, label=f"best (step {best['step']})")
    finite = [v for v in train[1] + val[1] if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 30:  # a loss that falls by orders of magnitude
        loss.set_yscale("log")
    loss.set(ylabel="loss", title=title)
    loss.grid(alpha=0.3)
    loss.legend()
    rate.plot(*lr, color="C2", linewidth=1.2)
    rate.set(xlabel="optimizer step", ylabel="learning rate")
    rate.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    rate.grid(alpha=0.3)
    return fig


def metrics(records: list[dict], title: str) -> Figure | None:
    """Each of the recipe's scalar validation metrics over the steps (the test value as a star at the step whose
    weights gave it), one panel each."""
    names = sorted({k for r in records if "event" not in r for k in r
                    if k.startswith("val/") and k != "val/loss" and not k.rsplit("/", 1)[-1].isdigit()})
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows + 0.5), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names, strict=False):
        ax.plot(*series(records, name), color="C1", marker="o", markersize=3, label="validation")
        test = tested(records, "test/" + name.removeprefix("val/"))
        if test[0]:
            ax.scatter(*test, color="C3", marker="*", s=120, zorder=3, label="test")
        ax.set(title=name.removeprefix("val/"), xlabel="optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def per_class(matrix: list[list[int]]) -> dict:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows: true, columns: predicted);
    a class never predicted (or never present) has precision (or recall) 0, as torchmetrics' zero_division."""
    m = np.asarray(matrix, dtype=np.float64)
    hits, predicted, support = np.diag(m), m.sum(0), m.sum(1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": support.astype(int).tolist()}


def confusion(classes: dict, title: str) -> Figure:
    """The test split's confusion matrix (a `classes` record), each row divided by its class's count: the diagonal
    is each class's recall."""
    m = np.asarray(classes["matrix"], dtype=np.float64)
    names, n = classes["names"], len(classes["names"])
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    side = min(12.0, 3 + 0.45 * n)
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    ticks = range(n)
    ax.set_xticks(ticks, names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right")
    ax.set_yticks(ticks, names)
    if n <= ANNOTATED:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if rows[i, j] > 0.5 else "black")
    accuracy = np.trace(m) / max(m.sum(), 1)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"{title}\ntest split, step {classes['weights_step']}'s weights: {int(m.sum()):,} samples, "
                 f"accuracy {accuracy:.4f}")
    return fig


def class_bars(classes: dict, title: str) -> Figure:
    """Precision, recall and F1 of each class on the test split, side by side."""
    n = len(classes["names"])
    fig = Figure(figsize=(8, 1.5 + 0.35 * n), dpi=100, layout="constrained")
    ax = fig.subplots()
    y, height = np.arange(n), 0.27
    for k, (name, color) in enumerate((("precision", "C0"), ("recall", "C1"), ("f1", "C2"))):
        ax.barh(y + (k - 1) * height, classes[name], height, color=color, label=name)
    ax.set_yticks(y, [f"{name} ({s:,})" for name, s in zip(classes["names"], classes["support"], strict=True)])
    ax.invert_yaxis()
    lowest = min(min(classes[name]) for name in ("precision", "recall", "f1"))
    start = max(0.0, math.floor(10 * lowest - 0.5) / 10)  # scores all near 1 would be slivers against 0 … 1
    ax.set(xlim=(start, 1), xlabel=f"score{f' from {start:g}' if start else ''} (samples of the class in brackets)",
           title=f"{title}\ntest split per class, step {classes['weights_step']}'s weights")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3)
    return fig


def lr_range(lrs, losses, curve, suggested, path: Path) -> None:
    """--find-lr: the loss against the learning rate, smoothed, with the suggested rate."""
    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot(lrs, losses, color="0.75", linewidth=1, label="loss")
    ax.plot(lrs, curve, color="C0", linewidth=2, label="smoothed")
    if suggested:
        ax.axvline(suggested, color="C3", linestyle="--", label=f"suggested {suggested:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    finite = [v for v in curve if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.legend()
    fig.savefig(path)


def sweep(points: list[tuple[float, float]], spec: dict, best: list[str], title: str) -> Figure:
    """A sweep's trials: each one's best metric against its value of a searched flag (sweep.Spec's fields), the
    best ringed, a range's ends drawn."""
    metric, mode, flag = *best, spec["flag"]
    fig = Figure(figsize=(6, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    xs, ys = zip(*points, strict=True)
    ax.scatter(xs, ys, color="C0", zorder=2)
    top = (min if mode == "min" else max)(points, key=lambda p: p[1])
    ax.scatter(*top, s=160, facecolors="none", edgecolors="C3", linewidths=2, zorder=3,
               label=f"best: {flag} {top[0]:g}, {metric} {top[1]:.4g}")
    for end in (spec["low"], spec["high"]):
        if end is not None:
            ax.axvline(end, color="0.5", linestyle="--", linewidth=1)
    # a log range, or searched values that span a factor of ten or more (a list such as 1e-4, 1e-3, 1e-2)
    logarithmic = spec["log"] or (min(xs) > 0 and max(xs) >= 10 * min(xs))
    ax.set(xscale="log" if logarithmic else "linear", xlabel=f"{flag} (dashed: the range searched)"
           if spec["low"] is not None else flag, ylabel=f"best {metric} ({mode})", title=f"sweep {title}")
    ax.xaxis.set_minor_formatter(NullFormatter())  # a log axis labels its minor ticks too, one over another
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
