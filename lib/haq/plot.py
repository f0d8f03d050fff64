"""Bar chart of a searched policy: bits per layer above the layer sizes, one column per layer."""
import os

from lib.haq.env import FP32_BITS


def plot_policy(path_png, layer_names, bits, n_weights, fixed_names=(), title=None):
    """Writes policy_figure(...) as a PNG. Returns path_png."""
    fig = policy_figure(layer_names, bits, n_weights, fixed_names, title)
    tmp = f"{path_png}.tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path_png)
    return path_png


def policy_figure(layer_names, bits, n_weights, fixed_names=(), title=None):
    """A matplotlib Figure (no pyplot: headless): top panel bits per layer, bottom panel the
    number of weights (log scale) on the same x positions. Layers in `fixed_names` (kept outside
    the search) and fp32 layers (bits None or 32, bar cut short and labelled) are drawn grey."""
    if not len(layer_names) == len(bits) == len(n_weights):
        raise ValueError(f"plot_policy: {len(layer_names)} names, {len(bits)} bit widths, "
                         f"{len(n_weights)} sizes; they must match")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    widths = [FP32_BITS if b is None else b for b in bits]
    is_fp32 = [w == FP32_BITS for w in widths]
    grey = [f or name in set(fixed_names) for f, name in zip(is_fp32, layer_names)]
    quantized = [w for w in widths if w != FP32_BITS]
    top = max(quantized, default=8) + 1  # fp32 bars are cut at the top and labelled, not drawn to 32
    x = range(len(layer_names))

    fig = Figure(figsize=(max(6.0, 0.35 * len(layer_names) + 2), 6.5))
    ax_bits, ax_size = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax_bits.bar(x, [top if f else w for w, f in zip(widths, is_fp32)],
                color=["0.75" if g else "tab:blue" for g in grey])
    for i, (w, f) in enumerate(zip(widths, is_fp32)):
        ax_bits.text(i, (top if f else w) + 0.1, "fp32" if f else str(w), ha="center", va="bottom", fontsize=7)
    ax_bits.set_ylim(0, top + 3)  # room for the labels and the legend
    ax_bits.set_ylabel("weight bits")
    if any(grey):
        ax_bits.legend(handles=[Patch(color="tab:blue", label="searched"),
                                Patch(color="0.75", label="fixed / fp32")], loc="upper center", ncol=2, fontsize=7)
    ax_bits.set_title(title or "searched bit width per layer")
    ax_size.bar(x, n_weights, color="tab:orange")
    ax_size.set_yscale("log")
    ax_size.set_ylabel("# weights")
    ax_size.set_xticks(list(x))
    ax_size.set_xticklabels(layer_names, rotation=90, fontsize=7)
    fig.tight_layout()
    return fig
