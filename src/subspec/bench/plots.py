"""PNG plots of a bench report (matplotlib, an optional extra): a timeline of each round,
tokens/s and tau against tree depth (as in the paper's Figure 1), and accept lengths."""

from __future__ import annotations

from pathlib import Path

from subspec.errors import SubspecError

PARTS = ("draft", "verify", "overlap")  # the order of a round's parts in round_parts


def write_plots(report: dict, directory: Path) -> list[Path]:
    """Write the plots of `report` (bench's JSON) into `directory`; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SubspecError("--plot needs matplotlib: pip install 'subspec[plot]'") from None
    directory.mkdir(parents=True, exist_ok=True)
    spec = {k: r for k, r in report["results"].items() if "round_parts" in r}
    if not spec:
        return []
    paths = [_timeline(plt, spec, directory), _histogram(plt, spec, directory)]
    paths.append(_by_depth(plt, report["results"], spec, directory))
    return paths


def _timeline(plt, spec: dict, directory: Path) -> Path:
    """One bar per round, stacked: drafting in the open, drafting during the pass's waits for
    weights (overlap), and the rest of the pass (verification, waiting)."""
    fig, axes = plt.subplots(len(spec), 1, figsize=(10, 2.6 * len(spec)), squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], spec.items(), strict=True):
        parts = list(zip(*r["round_parts"], strict=True)) or [[], [], []]
        x = range(len(r["round_parts"]))
        bottom = [0.0] * len(r["round_parts"])
        for label, values, color in zip(PARTS, parts, ("tab:orange", "tab:blue", "tab:green"),
                                        strict=True):  # fmt: skip
            ax.bar(x, values, bottom=bottom, label=label, color=color, width=0.85)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_title(f"{name}: {r['tokens_per_s']:.2f} tok/s, tau {r['tau']:.1f}")
        ax.set_xlabel("round")
        ax.set_ylabel("seconds")
        ax.legend(loc="upper right")
    return _save(plt, fig, directory / "timeline.png")


def _histogram(plt, spec: dict, directory: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    top = max(max(r["accept_lengths"], default=0) for r in spec.values())
    for name, r in spec.items():
        ax.hist(r["accept_lengths"], bins=range(top + 2), alpha=0.6, label=name, align="left")
    ax.set_xlabel("accepted draft tokens per round")
    ax.set_ylabel("rounds")
    ax.legend()
    return _save(plt, fig, directory / "accept_lengths.png")


def _by_depth(plt, results: dict, spec: dict, directory: Path) -> Path:
    """tokens/s and tau of each speculative run against its (mean) tree depth."""
    fig, ax = plt.subplots(figsize=(7, 4))
    runs = sorted(spec.items(), key=lambda kv: kv[1]["depth"])
    depths = [r["depth"] for _, r in runs]
    ax.plot(depths, [r["tokens_per_s"] for _, r in runs], "o-", color="tab:blue")
    for name, r in runs:
        ax.annotate(name, (r["depth"], r["tokens_per_s"]), fontsize=7)
    vanilla = results["vanilla"]["tokens_per_s"]
    ax.axhline(vanilla, color="gray", linestyle="--", label=f"vanilla {vanilla:.2f} tok/s")
    ax.set_xlabel("tree depth")
    ax.set_ylabel("tokens/s", color="tab:blue")
    twin = ax.twinx()
    twin.plot(depths, [r["tau"] for _, r in runs], "s--", color="tab:red")
    twin.set_ylabel("tau (tokens per target pass)", color="tab:red")
    ax.legend(loc="lower right")
    return _save(plt, fig, directory / "depth.png")


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
