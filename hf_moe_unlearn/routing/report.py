"""Human-readable views of routing statistics: the top-experts table and the forget/retain heatmap."""

from __future__ import annotations

import numpy as np

from .selection import ExpertSelection
from .stats import ExpertStats


def top_experts_table(
    forget: ExpertStats, retain: ExpertStats | None, selection: ExpertSelection, top: int = 3
) -> str:
    """Plain-text table: per layer, the experts forget tokens use most, with retain frequency, ratio and SEUF
    score; selected experts are starred.

    The SEUF column uses the score a SEUF selection ranked by (``params["score"]``), else the paper's
    masked softmax — or the gate score for statistics saved before the masked sums existed, so an old
    statistics file still prints."""
    score = selection.params.get("score") if selection.method == "seuf" else None
    if score is None:
        score = "masked_softmax" if forget.seq_masked_prob_mean_sum is not None else "gate"
    lines = [f"{'layer':>5}  {'expert':>6}  {'f_forget':>8}  {'f_retain':>8}  {'ratio':>7}  {'seuf':>7}"]
    for layer in forget.layers:
        f_f = forget.frequency(layer)
        f_r = retain.frequency(layer) if retain is not None else None
        seuf = forget.seuf_scores(layer, score=score)
        for e in np.argsort(-f_f, kind="stable")[:top]:
            mark = "*" if e in selection.experts.get(layer, []) else " "
            retain_text = f"{f_r[e]:8.4f}" if f_r is not None else f"{'-':>8}"
            ratio = f"{f_f[e] / max(f_r[e], 1e-6):7.2f}" if f_r is not None else f"{'-':>7}"
            lines.append(f"{layer:>5}  {mark}{e:>5}  {f_f[e]:8.4f}  {retain_text}  {ratio}  {seuf[e]:7.4f}")
    lines.append(f"* selected ({selection.method}): {selection.experts}; seuf = SEUF Eq. 2 score ({score})")
    return "\n".join(lines)


def plot_routing_heatmap(
    forget: ExpertStats, retain: ExpertStats | None, selection: ExpertSelection, path: str
) -> str:
    """Save a PNG with forget and retain expert frequency per layer side by side, selected experts boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = [("forget", forget.frequency_table())]
    if retain is not None:
        panels.append(("retain", retain.frequency_table()))
        ratio = panels[0][1] / np.maximum(panels[1][1], 1e-6)
        panels.append(("forget / retain", np.log2(np.clip(ratio, 1 / 64, 64))))
    n_layers, n_experts = panels[0][1].shape
    fig, axes = plt.subplots(
        1, len(panels), figsize=(min(4 + 0.25 * n_experts, 12) * len(panels) / 1.5, 1.5 + 0.35 * n_layers),
        squeeze=False,
    )
    vmax = max(float(p[1].max()) for p in panels[:2])
    for ax, (title, table) in zip(axes[0], panels):
        is_ratio = title.startswith("forget /")
        image = ax.imshow(
            table, aspect="auto", cmap="coolwarm" if is_ratio else "viridis",
            vmin=-6 if is_ratio else 0.0, vmax=6 if is_ratio else vmax,
        )
        ax.set_title(title + (" (log2)" if is_ratio else " token frequency"))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(n_layers), [str(l) for l in forget.layers])
        for layer, experts in selection.experts.items():
            if layer in forget.layers:
                row = forget.layers.index(layer)
                for e in experts:
                    ax.add_patch(Rectangle((e - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"Routing of forget vs retain tokens — selected ({selection.method}) in red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
