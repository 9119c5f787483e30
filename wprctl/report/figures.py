"""The report's PNG figures.

Figures are drawn on `matplotlib.figure.Figure` objects rendered by the Agg canvas, never through
pyplot, so no GUI backend or global figure state is involved (and matplotlib is imported only
when a figure is drawn).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wprctl.report.collect import Run
from wprctl.report.tables import apps_ks, ci95, difficulties, fmt, judge_sides, regularizer_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIG_SIZE = (8.0, 5.0)  # inches; at DPI this is 1000x625 px
DPI = 125


@dataclass
class FigureFile:
    file: str
    title: str
    caption: str


def _new_figure(ncols: int = 1, width: float | None = None) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width or FIG_SIZE[0], FIG_SIZE[1]), dpi=DPI, layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _save(fig: Figure, out_dir: Path, name: str) -> None:
    fig.savefig(out_dir / name, dpi=DPI)


def smooth(values: Sequence[float]) -> list[float]:
    """A trailing moving average over ~10% of the points; short series are left as logged."""
    n = len(values)
    if n < 15:
        return list(values)
    window = max(3, n // 10)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def color_map(runs: Sequence[Run]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {r.name: palette[i % len(palette)] for i, r in enumerate(runs)}


def _plot_train_eval(
    ax: Axes, run: Run, train_key: str | None, eval_key: str | None, color: Any, label: str
) -> bool:
    """Train curve (faint raw + smoothed line) and held-out evaluations (markers, dashed)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, also on short PPO runs
    drew = False
    if train_key:
        steps, values = run.series(train_key)
        if steps:
            smoothed = smooth(values)
            if smoothed != values:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smoothed, color=color, linewidth=1.8, label=f"{label} (train)")
            drew = True
    if eval_key:
        steps, values = run.series(eval_key)
        if steps:
            ax.plot(
                steps,
                values,
                color=color,
                linestyle="--",
                marker="o",
                markersize=5,
                linewidth=1.2,
                label=f"{label} (eval)",
            )
            drew = True
    return drew


def loss_figure(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    runs = [r for r in runs if r.series("train/loss")[0] or r.series("eval/loss")[0]]
    if not runs:
        return None
    fig, (ax,) = _new_figure()
    colors = color_map(runs)
    for r in runs:
        _plot_train_eval(ax, r, "train/loss", "eval/loss", colors[r.name], r.label)
    ax.set(title="SFT: language-modelling loss", xlabel="optimizer step", ylabel="cross-entropy")
    ax.legend()
    _save(fig, out_dir, "sft_loss.png")
    return FigureFile(
        "sft_loss.png",
        "SFT loss",
        "Token cross-entropy of the SFT model on its training batches (solid) and on the "
        "held-out split (dashed, markers). Both should fall; a widening gap means overfitting.",
    )


def rm_figure(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    runs = [r for r in runs if r.rows]
    if not runs:
        return None
    fig, (ax_loss, ax_acc) = _new_figure(ncols=2, width=12)
    colors = color_map(runs)
    for r in runs:
        _plot_train_eval(ax_loss, r, "train/loss", "eval/loss", colors[r.name], r.label)
        _plot_train_eval(ax_acc, r, "train/accuracy", "eval/accuracy", colors[r.name], r.label)
    ax_loss.set(
        title="Reward model: pairwise loss", xlabel="optimizer step", ylabel="-log σ(margin)"
    )
    ax_acc.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    ax_acc.set(
        title="Reward model: preference accuracy",
        xlabel="optimizer step",
        ylabel="P(chosen scored above rejected)",
        ylim=(0.0, 1.0),
    )
    ax_loss.legend()
    ax_acc.legend(loc="lower right")
    _save(fig, out_dir, "rm_training.png")
    return FigureFile(
        "rm_training.png",
        "Reward model loss and accuracy",
        "Left: the Bradley-Terry loss on training batches (solid) and on held-out pairs "
        "(dashed). Right: how often the chosen response scores above the rejected one; 0.5 is "
        "chance.",
    )


@dataclass(frozen=True)
class PolicyCurve:
    file: str
    title: str
    ylabel: str
    train_key: str | None
    eval_key: str | None
    caption: str


POLICY_CURVES = (
    PolicyCurve(
        "policy_reward.png",
        "Reward-model score",
        "reward (RM score)",
        "train/reward",
        "eval/reward",
        "The reward model's score of the policy's responses: rollout batches (solid, smoothed "
        "when long) and held-out prompts (dashed, markers; step 0 is the SFT policy). Rising "
        "means the policy learns what the reward model prefers.",
    ),
    PolicyCurve(
        "policy_gold.png",
        "Gold reward (the demo's oracle)",
        "gold reward",
        "train/gold",
        "eval/gold",
        "The task's true quality score, which the policy never sees. Where the RM score rises "
        "and the gold score does not, the policy is exploiting the reward model.",
    ),
    PolicyCurve(
        "policy_penalty.png",
        "Regularizer penalty",
        "per-token penalty (mean)",
        "train/penalty",
        None,
        "The regularizer's per-token penalty subtracted from the reward (β times the WPR dual "
        "potential or the KL estimate). DAR has no such term and is absent here.",
    ),
    PolicyCurve(
        "policy_kl.png",
        "KL to the reference policy",
        "KL(π || π_ref) per response",
        "train/kl_ref",
        "eval/kl_ref",
        "The k1 estimate of KL to the reference (SFT) policy, the same measure for every "
        "regularizer, so the variants' drift can be compared directly.",
    ),
    PolicyCurve(
        "policy_length.png",
        "Response length",
        "tokens",
        "train/length",
        "eval/length",
        "Mean response length; a steady climb with reward is a sign of length hacking.",
    ),
)


def policy_figure(
    curve: PolicyCurve, runs: Sequence[Run], colors: dict[str, Any], out_dir: Path
) -> FigureFile | None:
    fig, (ax,) = _new_figure()
    drew = False
    for r in runs:
        drew |= _plot_train_eval(ax, r, curve.train_key, curve.eval_key, colors[r.name], r.label)
    if not drew:
        return None
    ax.set(
        title=f"Policy optimisation: {curve.title.lower()}",
        xlabel="PPO / DAR step",
        ylabel=curve.ylabel,
    )
    ax.legend(fontsize="small")
    _save(fig, out_dir, curve.file)
    return FigureFile(curve.file, curve.title, curve.caption)


def frontier_figure(
    runs: Sequence[Run], colors: dict[str, Any], out_dir: Path
) -> FigureFile | None:
    metrics = [m for m in ("eval/reward", "eval/gold") if any(r.series(m)[0] for r in runs)]
    points = [r for r in runs if r.series("eval/kl_ref")[0]]
    if not metrics or not points:
        return None
    fig, axes = _new_figure(ncols=len(metrics), width=6.5 * len(metrics))
    for ax, metric in zip(axes, metrics, strict=True):
        starts = {
            r.name: (r.first("eval/kl_ref"), r.first(metric))
            for r in points
            if r.first(metric) is not None and r.first("eval/kl_ref") is not None
        }
        shared = len({(round(x, 6), round(y, 6)) for x, y in starts.values()}) == 1
        if shared:
            x0, y0 = next(iter(starts.values()))
            ax.scatter(
                [x0], [y0], marker="*", s=220, color="grey", zorder=3, label="start (SFT policy)"
            )
        else:
            # runs that started from different policies (or evaluated them on another number of
            # processes) each get their own start, joined to their end: one grey star would
            # measure some runs from a point they never were at
            for r in points:
                if r.name in starts and r.last(metric) is not None:
                    (x0, y0), x1, y1 = starts[r.name], r.last("eval/kl_ref"), r.last(metric)
                    ax.scatter([x0], [y0], marker="*", s=160, color=colors[r.name], zorder=3)
                    ax.plot([x0, x1], [y0, y1], ls=":", lw=1, color=colors[r.name], zorder=2)
            ax.scatter([], [], marker="*", s=160, color="grey", label="start of each run")
        placed = sorted(
            ((r, r.last("eval/kl_ref"), r.last(metric)) for r in points),
            key=lambda p: (p[1] is None, p[1] or 0.0, p[2] or 0.0),
        )
        for i, (r, x, y) in enumerate(placed):
            if x is None or y is None:
                continue
            ax.scatter(
                [x],
                [y],
                s=90,
                color=colors[r.name],
                zorder=4,
                label=f"{r.label}: {regularizer_label(r)}",
                marker="s" if r.kind == "dar" else "o",
            )
            # neighbours along x alternate above and below so close points keep readable names
            ax.annotate(
                r.name,
                (x, y),
                textcoords="offset points",
                fontsize=8,
                xytext=(7, 6 if i % 2 == 0 else -13),
            )
        which = "reward-model score" if metric == "eval/reward" else "gold reward"
        ax.set(
            title=f"{which} vs KL to reference",
            xlabel="held-out KL(π || π_ref)",
            ylabel=f"held-out {which}",
        )
        ax.margins(0.25)
        ax.legend(fontsize="small", loc="best")
    _save(fig, out_dir, "frontier.png")
    return FigureFile(
        "frontier.png",
        "Reward-vs-KL frontier",
        "One point per variant at its last held-out evaluation: reward (and gold reward, when "
        "the task has one) against KL to the reference. Up and to the left is better: more "
        "reward for less drift. The star is the starting policy (one per run, joined to its point, "
        "when the runs started from different ones).",
    )


def judge_figure(
    runs: Sequence[Run], names_by_file: dict[str, str], out_dir: Path
) -> FigureFile | None:
    runs = [r for r in runs if isinstance((r.summary or {}).get("win_rate"), int | float)]
    if not runs:
        return None
    fig, (ax,) = _new_figure(width=9)
    fig.set_figheight(max(3.2, 1.0 + 0.7 * len(runs)))
    ys = list(range(len(runs)))[::-1]
    labels = []
    for y, r in zip(ys, runs, strict=True):
        s = r.summary or {}
        rate = float(s["win_rate"])
        ci = ci95(s)
        a, b = judge_sides(r, names_by_file)
        labels.append(f"{a}\nvs {b}")
        err = [[rate - ci[0]], [ci[1] - rate]] if ci else None
        color = (
            "tab:green" if ci and ci[0] > 0.5 else "tab:red" if ci and ci[1] < 0.5 else "tab:blue"
        )
        ax.barh([y], [rate], xerr=err, color=color, alpha=0.75, capsize=6, height=0.6)
        n = sum(int(s.get(k) or 0) for k in ("wins", "ties", "losses"))
        text = f"{rate:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f"  n={n}"
        # right of the axes (x in axes coordinates) so long bars never hide the figures
        ax.text(1.02, y, text, transform=ax.get_yaxis_transform(), va="center", fontsize=9)
    ax.axvline(0.5, color="black", linestyle=":", linewidth=1)
    ax.set_yticks(ys, labels, fontsize=9)
    ax.set(
        xlim=(0.0, 1.0),
        xlabel="win rate of A over B (ties count half), 95% bootstrap CI",
        title="Pairwise judge: win rates",
    )
    _save(fig, out_dir, "judge_win_rates.png")
    return FigureFile(
        "judge_win_rates.png",
        "Judge win rates",
        "Each bar is one judged comparison, A over B, with its 95% bootstrap interval. Green: A "
        "is better with confidence (interval above 0.5); red: B is; blue: undecided.",
    )


def apps_figure(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    runs = [r for r in runs if (r.summary or {}).get("pass@k")]
    ks = apps_ks(runs)
    if not runs or not ks:
        return None
    groups = [*difficulties(runs), "all"]
    fig, axes = _new_figure(ncols=len(ks), width=max(8.0, 4.6 * len(ks)))
    colors = color_map(runs)
    width = 0.8 / len(runs)
    for ax, k in zip(axes, ks, strict=True):
        for i, r in enumerate(runs):
            s = r.summary or {}
            values = []
            for g in groups:
                block = s if g == "all" else s.get("by_difficulty", {}).get(g, {})
                v = block.get("pass@k", {}).get(k)
                values.append(float(v) if isinstance(v, int | float) else float("nan"))
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(groups))]
            bars = ax.bar(xs, values, width=width, color=colors[r.name], label=r.label)
            ax.bar_label(
                bars,
                labels=[f"{v:.2f}" if v == v else "n/a" for v in values],
                fontsize=7,
                padding=2,
            )
        n = {
            g: (runs[0].summary or {}).get("n_problems")
            if g == "all"
            else (runs[0].summary or {}).get("by_difficulty", {}).get(g, {}).get("n_problems")
            for g in groups
        }
        ax.set_xticks(range(len(groups)), [f"{g}\n(n={fmt(n[g])})" for g in groups], fontsize=8)
        ax.set(title=f"pass@{k}", ylim=(0.0, 1.1), ylabel="fraction of problems solved")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(runs), 4))
    fig.suptitle("APPS: pass@k per difficulty")
    _save(fig, out_dir, "apps_passk.png")
    return FigureFile(
        "apps_passk.png",
        "APPS pass@k per difficulty",
        "Unbiased pass@k (a problem counts when at least one of k samples passes all its unit "
        "tests) per difficulty and overall, one bar colour per apps-eval run.",
    )


# every file the report may write: a later report removes the ones it no longer produces
FIGURE_FILES = (
    "sft_loss.png",
    "rm_training.png",
    *(c.file for c in POLICY_CURVES),
    "frontier.png",
    "judge_win_rates.png",
    "apps_passk.png",
)
