"""The study's outputs from the per-run evaluations: JSON (every number), PNG, Markdown table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tools.studylib import stats

SAMPLERS = ("1step", "2step")


def collect(plan: dict, evals: dict[tuple[str, int], dict]) -> dict:
    """Everything in one JSON-able dict: the plan and, per arm and seed, every step's numbers."""
    runs = {
        arm: {str(seed): evals[(arm, seed)] for seed in plan["seeds"] if (arm, seed) in evals}
        for arm in plan["arms"]
    }
    return {"plan": plan, "runs": runs}


def _series(result: dict, arm: str, key: str, sampler: str, step: int) -> dict[int, float]:
    """seed -> value at `step` for the seeds that have it."""
    out = {}
    for seed, rows in result["runs"][arm].items():
        row = rows.get(str(step))
        if row is not None:
            out[int(seed)] = float(row[sampler][key])
    return out


def _matched(
    result: dict, key: str, sampler: str, first: tuple[str, int], second: tuple[str, int]
) -> tuple[list[int], list[float], list[float]]:
    """The seeds that have both (arm, step) points, and their values at each, seed by seed."""
    a = _series(result, first[0], key, sampler, first[1])
    b = _series(result, second[0], key, sampler, second[1])
    seeds = sorted(set(a) & set(b))
    return seeds, [a[s] for s in seeds], [b[s] for s in seeds]


def _window(
    result: dict, arm: str, key: str, sampler: str, steps: list[int]
) -> tuple[list[int], list[dict[int, float]]]:
    """The seeds that have every one of `steps`, and seed -> value at each step."""
    series = [_series(result, arm, key, sampler, s) for s in steps]
    return sorted(set.intersection(*(set(x) for x in series))), series


def _fmt(m: float, lo: float, hi: float, digits: int = 2) -> str:
    if math.isnan(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _paired(seeds: list[int], diffs: list[float], **where) -> dict:
    m, lo, hi = stats.bootstrap_ci(diffs)
    return {**where, "seeds": seeds, "diffs": diffs, "mean": m, "low": lo, "high": hi}


def summarize(result: dict, *, key: str, ratio: float, baseline: str = "joint") -> dict:
    """Final-step means with t intervals, paired differences with bootstrap intervals (at equal
    steps and at equal compute) and the secondary numbers (classes, evenness, nn distance)."""
    plan = result["plan"]
    final = plan["eval_steps"][-1]
    # The baseline first, the rest in the plan's order (a JSON written before keys kept their
    # order has them sorted).
    arms = sorted((a for a in plan["arms"] if result["runs"].get(a)), key=lambda a: a != baseline)
    summary: dict = {"final_step": final, "metric": key, "arms": {}, "paired": {}}
    summary["flatness"] = flatness(result, key=key)
    for arm in arms:
        entry = {}
        for smp in SAMPLERS:
            vals = _series(result, arm, key, smp, final)
            entry[smp] = dict(zip(("mean", "low", "high"), stats.mean_ci(list(vals.values()))))
            entry[smp]["n"] = len(vals)
            for extra in ("classes", "evenness", "nn_rms"):
                ex = _series(result, arm, extra, smp, final) if key == "fd" else {}
                if ex:
                    entry[smp][extra] = float(np.mean(list(ex.values())))
        summary["arms"][arm] = entry
    window = summary["flatness"].get("window") or []
    for other in (a for a in arms if a != baseline):
        for label, s_base, s_other in _pairs(plan, other, ratio):
            for smp in SAMPLERS:
                seeds, a, b = _matched(result, key, smp, (baseline, s_base), (other, s_other))
                if seeds:
                    d = [x - y for x, y in zip(a, b)]
                    summary["paired"][f"{baseline}-{other} {label} {smp}"] = _paired(
                        seeds, d, baseline_step=s_base, other_step=s_other
                    )
        # Once the metric has flattened, the mean over the last quarter's evaluations is a
        # less noisy final number than the last evaluation alone.
        for smp in SAMPLERS if len(window) > 1 else ():
            seeds_b, base = _window(result, baseline, key, smp, window)
            seeds_o, oth = _window(result, other, key, smp, window)
            seeds = sorted(set(seeds_b) & set(seeds_o))
            if seeds:
                d = [
                    float(np.mean([x[i] for x in base]) - np.mean([x[i] for x in oth]))
                    for i in seeds
                ]
                label = f"mean over steps {window[0]}-{window[-1]}"
                summary["paired"][f"{baseline}-{other} {label} {smp}"] = _paired(
                    seeds, d, steps=window
                )
    return summary


# Has the metric flattened? Per seed, a least-squares line through log(metric) over the evaluations
# in the last quarter of the run gives the relative change across that quarter; the mean over seeds
# has a percentile-bootstrap interval. "flat": the whole interval lies above -FLAT_TOLERANCE (more
# steps at these settings would buy less than 5% per quarter of the run); "rising" (which also
# counts as flat: no longer falling), above +FLAT_TOLERANCE: the metric got worse; "falling": below
# -FLAT_TOLERANCE; "undetermined" otherwise (too noisy to say). A fit over several points because
# one 500-sample evaluation moves by 10-40% between neighbouring checkpoints (docs/results.md), and
# a tolerance rather than "below 0" because a curve that approaches its asymptote falls forever by
# ever smaller amounts. Under iCT's K = num_steps the last quarter begins at the final doubling of
# N(k), whose drop then counts: such a run has not flattened; with train.curriculum_steps <
# num_steps it measures training at the final N. The last interval's change alone is reported
# beside it.
FLAT_TOLERANCE = 0.05


def _fitted_change(steps: list[int], values: list[float]) -> float:
    """exp(slope * span) - 1 for the least-squares line through (step, log value)."""
    slope = np.polyfit(np.asarray(steps, np.float64), np.log(values), 1)[0]
    return math.expm1(slope * (steps[-1] - steps[0]))


def flatness(result: dict, *, key: str) -> dict:
    """Per arm and sampler: the fitted relative change of `key` over the last quarter of the run
    per seed, its mean with a bootstrap interval, the verdict (FLAT_TOLERANCE; `verdict` is
    'flat', 'rising', 'falling' or 'undetermined'), and the change over the last interval alone."""
    steps = result["plan"]["eval_steps"]
    final = steps[-1]
    window = [s for s in steps if s >= final - final // 4]
    if len(window) < 2:  # the last quarter holds one point: fall back on the last interval
        window = steps[-2:]
    out: dict = {
        "from_step": window[0], "to_step": final, "window": window,
        "tolerance": FLAT_TOLERANCE, "arms": {},
    }  # fmt: skip
    if len(window) < 2:
        return out
    for arm, runs in result["runs"].items():
        if not runs:
            continue
        out["arms"][arm] = {}
        for smp in SAMPLERS:
            seeds, series = _window(result, arm, key, smp, window)
            if not seeds:
                continue
            fitted = [_fitted_change(window, [x[seed] for x in series]) for seed in seeds]
            last = [series[-1][seed] / series[-2][seed] - 1.0 for seed in seeds]
            m, lo, hi = stats.bootstrap_ci(fitted)
            verdict = (
                "rising" if lo > FLAT_TOLERANCE
                else "flat" if lo > -FLAT_TOLERANCE
                else "falling" if hi < -FLAT_TOLERANCE
                else "undetermined"
            )  # fmt: skip
            out["arms"][arm][smp] = {
                "seeds": seeds, "changes": fitted, "mean": m, "low": lo, "high": hi,
                "verdict": verdict, "flat": verdict in ("flat", "rising"),
                "falling": verdict == "falling",
                "last_interval": {"from_step": window[-2], "changes": last,
                                  "mean": float(np.mean(last))},
            }  # fmt: skip
    return out


def _pairs(plan: dict, other: str, ratio: float) -> list[tuple[str, int, int]]:
    steps = plan["eval_steps"]
    out = [("equal steps", steps[-1], steps[-1])]
    if other == "ict":  # the head costs the joint step ~`ratio` ict steps
        pair = stats.equal_compute_step(steps, steps, ratio)
        if pair is not None:
            out.append((f"equal compute (joint {pair[0]} vs ict {pair[1]})", *pair))
    return out


def markdown(summary: dict, *, baseline_note: str = "") -> str:
    key = summary["metric"]
    lines = [
        f"Final step {summary['final_step']}: {key} (lower is better), mean over seeds with a 95% "
        "Student-t interval [low, high]" + (f"; {baseline_note}" if baseline_note else ""),
        "",
        "| arm | seeds | 1-step | 2-step | classes 1/2-step | evenness 1/2-step "
        "| nn RMS 1/2-step |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, e in summary["arms"].items():
        one, two = e["1step"], e["2step"]
        extra = [
            f"{one.get(k, float('nan')):.{d}f} / {two.get(k, float('nan')):.{d}f}"
            for k, d in (("classes", 1), ("evenness", 3), ("nn_rms", 3))
        ]
        lines.append(
            f"| {arm} | {one['n']} | {_fmt(one['mean'], one['low'], one['high'])} | "
            f"{_fmt(two['mean'], two['low'], two['high'])} | " + " | ".join(extra) + " |"
        )
    lines += [
        "",
        "Paired differences over seeds (negative: the first arm is better), mean with a 95% "
        "percentile-bootstrap interval over seeds:",
        "",
        "| comparison | sampler | per-seed differences | mean [95% CI] |",
        "|---|---|---|---|",
    ]
    for name, p in summary["paired"].items():
        label, smp = name.rsplit(" ", 1)
        diffs = ", ".join(f"{x:+.2f}" for x in p["diffs"])
        lines.append(f"| {label} | {smp} | {diffs} | {_fmt(p['mean'], p['low'], p['high'])} |")
    flat = summary.get("flatness", {})
    if flat.get("arms"):
        lines += [
            "",
            f"Has the metric flattened? Relative change of {key} over the last quarter of the run "
            f"(steps {flat['from_step']}-{flat['to_step']}, a least-squares line through log "
            f"{key} at {len(flat['window'])} evaluations) per seed, mean with a 95% percentile-"
            f"bootstrap interval; flat when the whole interval is above -{flat['tolerance']:.0%} "
            f"(rising: above +{flat['tolerance']:.0%}), falling when it is below -"
            f"{flat['tolerance']:.0%}, undetermined otherwise. The last interval alone beside it:",
            "",
            "| arm | sampler | per-seed change | mean [95% CI] | verdict | last interval, mean |",
            "|---|---|---|---|---|---|",
        ]
        for arm, by_smp in flat["arms"].items():
            for smp, f in by_smp.items():
                changes = ", ".join(f"{x:+.1%}" for x in f["changes"])
                span = f"{f['mean']:+.1%} [{f['low']:+.1%}, {f['high']:+.1%}]"
                li = f["last_interval"]
                lines.append(
                    f"| {arm} | {smp} | {changes} | {span} | {f['verdict']} | "
                    f"{li['mean']:+.1%} ({li['from_step']}-{flat['to_step']}) |"
                )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, *, key: str, title: str) -> None:
    """Metric against step per arm: the mean over seeds and its 95% t band, 1- and 2-step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = result["plan"]
    steps = plan["eval_steps"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, smp in zip(axes, SAMPLERS):
        for arm in plan["arms"]:
            if not result["runs"].get(arm):
                continue
            rows = [stats.mean_ci(list(_series(result, arm, key, smp, s).values())) for s in steps]
            m, lo, hi = (np.array(c) for c in zip(*rows))
            n = len(result["runs"][arm])
            ax.plot(steps, m, marker="o", label=f"{arm} (n={n})")
            ax.fill_between(steps, lo, hi, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{key} ({smp}, lower is better)")
        ax.set_title(f"{smp} samples")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, summary: dict, out_prefix: Path, *, title: str, note: str = "") -> None:
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    out_prefix.with_suffix(".json").write_text(
        json.dumps({**result, "summary": summary}, indent=1)  # keys in order: arms as planned
    )
    out_prefix.with_suffix(".md").write_text(markdown(summary, baseline_note=note))
    plot(result, out_prefix.with_suffix(".png"), key=summary["metric"], title=title)
