"""Singular value spectra and cumulative energy curves of a ``to-lora`` conversion, as a PNG.

matplotlib is an optional extra (``pip install 'bora-tools[plot]'``), imported
only here and only when a plot is asked for. The object-oriented API (``Figure``
with the Agg canvas) is used, never ``pyplot``: no global state, no display.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bora_tools.errors import UnsupportedError

if TYPE_CHECKING:
    from bora_tools.core.lowrank import ModuleResult


def require_matplotlib() -> None:
    """Raise a one-line error with the install command when matplotlib is missing.

    Example: ``require_matplotlib()`` returns quietly when ``import matplotlib`` works.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise UnsupportedError("`plot` needs matplotlib, which is not installed",
                               hint="pip install 'bora-tools[plot]'") from e


def module_kind(name: str) -> str:
    """The module type a curve is grouped under: the name after its layer number.

    Example: ``module_kind("transformer.h.3.mlp.c_proj")`` -> ``"mlp.c_proj"`` (GPT-2 has
    an ``attn.c_proj`` too, so the last component alone would mix them).
    """
    parts = name.split(".")
    numbers = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[numbers[-1] + 1:]) if numbers and numbers[-1] < len(parts) - 1 else parts[-1]


def plot_spectra(
    results: list[ModuleResult], path: str | Path, *, title: str = "", energy: float | None = None
) -> None:
    """Draw, per module type, the singular values (log scale) and the cumulative energy of every
    module, with the rank kept marked on each curve, and save a PNG to ``path``.

    Example::

        _, results = convert_adapter(adapter, RankPolicy.parse(energy=0.9))
        plot_spectra(results, "spectra.png", title="my-bora", energy=0.9)
    """
    require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: dict[str, list] = {}
    for r in results:
        groups.setdefault(module_kind(r.name), []).append(r)
    fig = Figure(figsize=(11, 0.6 + 2.7 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    cmap = colormaps["viridis"]
    for (kind, mods), (ax_s, ax_e) in zip(groups.items(), axes):
        for i, mod in enumerate(mods):
            # viridis up to green only: its last, pale yellow, is hard to see on white
            _draw_module(ax_s, ax_e, mod, cmap(0.7 * i / max(1, len(mods) - 1)))
        cuts = sorted({m.rank for m in mods if m.update_rank > 0})
        cut_text = f"cut k={cuts[0]}" if len(cuts) == 1 else f"cuts k={cuts[0]}..{cuts[-1]}" if cuts else "all zero"
        ax_s.set_title(f"{kind}: singular values ({len(mods)} modules; {cut_text})", fontsize=9)
        ax_s.set_yscale("log")
        ax_s.set_ylabel("singular value")
        ax_e.set_title(f"{kind}: cumulative energy retained", fontsize=9)
        ax_e.set_ylabel("fraction of ||dW||²")
        ax_e.set_ylim(min(0.0, ax_e.get_ylim()[0]), 1.02)
        if energy is not None:
            ax_e.axhline(energy, color="tab:red", linestyle=":", linewidth=1, label=f"--energy {energy:g}")
            ax_e.legend(loc="lower right", fontsize=8)
        for ax in (ax_s, ax_e):
            ax.grid(True, alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("rank k")
    legend = "dots: the rank kept; colour: layer order, purple = first layer, green = last"
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=10)
    fig.savefig(str(path), format="png", dpi=100)


def _draw_module(ax_s, ax_e, mod: ModuleResult, color) -> None:
    import numpy as np

    s = mod.singular_values.double().numpy() if mod.singular_values is not None else np.zeros(0)
    if s.size == 0 or s[0] <= 0:
        return  # a zero update has no spectrum to draw
    x = np.arange(1, s.size + 1)
    cum = np.cumsum(s**2) / np.sum(s**2)
    shown = np.where(s > 0, s, np.nan)  # exact zeros have no place on a log axis
    k = min(mod.rank, s.size)
    ax_s.plot(x, shown, color=color, linewidth=0.8, alpha=0.8)
    ax_e.plot(x, cum, color=color, linewidth=0.8, alpha=0.8)
    ax_s.plot([k], [shown[k - 1]], "o", color=color, markersize=3.5, markeredgecolor="black", markeredgewidth=0.4)
    ax_e.plot([k], [cum[k - 1]], "o", color=color, markersize=3.5, markeredgecolor="black", markeredgewidth=0.4)
