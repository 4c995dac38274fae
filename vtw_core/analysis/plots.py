"""Figures for the K search and the attention analysis (matplotlib, no display needed)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files and the web app only; never a window

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

SEGMENT_COLOURS = {"system": "#8c8c8c", "vision": "#e4572e", "instruction": "#2e86ab", "output": "#76b041"}


def kl_curve_figure(result: dict[str, Any]) -> Figure:
    """Mean KL(P_vtw || P_baseline) against K, log scale, with eta and the chosen K marked."""
    figure, axes = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    ks = [point["k"] for point in result["curve"]]
    kls = [max(point["kl"], 1e-12) for point in result["curve"]]  # log scale: a zero would vanish
    axes.plot(ks, kls, marker="o", color="#2e86ab", label="mean KL over the calibration set")
    axes.axhline(result["eta"], color="#e4572e", linestyle="--", label=f"eta = {result['eta']:g}")
    if result["k"] is not None:
        chosen = ks.index(result["k"])
        axes.scatter([result["k"]], [kls[chosen]], s=160, facecolors="none", edgecolors="#e4572e", linewidths=2,
                     zorder=3, label=f"chosen K = {result['k']}")  # fmt: skip
    axes.set_yscale("log")
    axes.set_xlabel("K (decoder layers that see the image)")
    axes.set_ylabel("KL(P_vtw || P_baseline)")
    title = f"K search: K = {result['k']}" if result["k"] is not None else "K search: no K meets eta"
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def k_curve_figure(report: dict[str, Any]) -> Figure:
    """Accuracy at every K with the baseline's as a line, and the K search's mean KL on a second, log axis.

    The paper's Figure 8: accuracy stays flat down to some K and falls below it; the KL criterion should stop
    the search before the fall. `report` is `eval --all-k --json` output (with `--k auto` for the KL curve).
    """
    figure, axes = plt.subplots(figsize=(6.8, 3.8), layout="constrained")
    rows = report["accuracy_per_k"]
    ks = [row["k"] for row in rows]
    axes.plot(ks, [row["accuracy"] * 100 for row in rows], marker="o", color="#2e86ab", label="VTW accuracy")
    axes.axhline(report["baseline"]["accuracy"] * 100, color="black", linewidth=1, label="baseline accuracy")
    if "vtw" in report:
        axes.axvline(report["vtw"]["k"], color="#e4572e", linestyle=":", label=f"searched K = {report['vtw']['k']}")
    axes.set_xlabel("K (decoder layers that see the image)")
    axes.set_ylabel("accuracy (%)")
    axes.set_xticks(ks)
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if report.get("kl_curve"):
        kl_axes = axes.twinx()
        curve = report["kl_curve"]
        kl_axes.plot([p["k"] for p in curve], [max(p["kl"], 1e-12) for p in curve], marker="s", color="#76b041",
                     linestyle="--", label="mean KL (calibration)")  # fmt: skip
        if report.get("eta"):
            eta = report["eta"]
            kl_axes.axhline(eta, color="#76b041", linewidth=1, linestyle=":", label=f"eta = {eta:g}")
        kl_axes.set_yscale("log")
        kl_axes.set_ylabel("KL(P_vtw || P_baseline)")
        more_handles, more_labels = kl_axes.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axes.legend(handles, labels, fontsize=8, loc="center right")
    axes.set_title(f"Accuracy and KL against K on {report.get('data', '')} {report.get('split', '')}")
    return figure


def attention_figure(report: dict[str, Any], token: str = "prompt") -> Figure:
    """Stacked per-layer shares of the last token's attention: system, vision, instruction, output."""
    if token == "prompt" or not report["generated"]:
        per_layer, label = report["prompt"], "last prompt token"
    else:
        # The mean over generated tokens, as the paper's Figure 5 averages over the output.
        steps = report["generated"]
        per_layer = [
            {name: sum(step[layer][name] for step in steps) / len(steps) for name in report["segments"]}
            for layer in range(report["num_layers"])
        ]
        label = f"generated tokens (mean of {len(steps)})"
    figure, axes = plt.subplots(figsize=(7.2, 3.6), layout="constrained")
    layers = list(range(report["num_layers"]))
    bottom = [0.0] * len(layers)
    for name in report["segments"]:
        values = [shares[name] for shares in per_layer]
        axes.bar(layers, values, bottom=bottom, color=SEGMENT_COLOURS.get(name), label=name, width=0.85)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    if report.get("k") is not None:
        axes.axvline(report["k"] - 0.5, color="black", linestyle="--", linewidth=1)
        axes.text(report["k"] - 0.4, 1.03, f"K = {report['k']}", fontsize=8, va="bottom")  # inside the y range
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("share of attention")
    axes.set_ylim(0, 1.12)
    axes.set_title(f"Where the {label} looks, per layer")
    # A figure legend "outside" the axes: constrained layout makes room for it, so it is never clipped.
    figure.legend(ncols=4, fontsize=8, loc="outside lower center")
    return figure


def tradeoff_figure(report: dict[str, Any]) -> Figure:
    """Accuracy against prefill FLOPs per question: a point per method and setting (both papers' trade-off)."""
    figure, axes = plt.subplots(figsize=(7.6, 4.2), layout="constrained")
    points = [("baseline", report["baseline"])]
    if "vtw" in report:
        points.append((f"VTW K={report['vtw']['k']} (searched)", report["vtw"]))
    points += [(f"VTW K={row['k']}", row) for row in report.get("accuracy_per_k", [])]
    points += [(row["label"], row) for row in report.get("methods", [])]
    largest = max(row["prefill_flops"] for _, row in points)
    scale, unit = (1e12, "TFLOPs") if largest >= 1e10 else (1e9, "GFLOPs")
    markers = "osD^v<>pP*Xh"
    for index, (label, row) in enumerate(points):
        axes.scatter(row["prefill_flops"] / scale, row["accuracy"] * 100, s=45, zorder=3, label=label,
                     marker=markers[index % len(markers)], color="black" if label == "baseline" else None)  # fmt: skip
    axes.set_xlabel(f"prefill {unit} per question (language model)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"Accuracy vs compute on {report.get('data', '')} {report.get('split', '')}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure
