"""The evidence study: does the MI term help, by how much, at what cost (bench/study.py runs it).

The unit of observation is a distillation seed (a new distilled set). Every comparison is paired on
the same seeds; settings are chosen on the validation split and the test split only appears in the
final tables. The study is a list of parts, each an ablation sweep (``ablation.run_sweep``: cached,
resumable, parallel workers) over one base setting:

* ``methods``: on digits and mnist5k at IPC 1 and 10, each base method with and without the term,
  with cross-architecture evaluation of the final sets (ConvNet, MLP, LeNet, ResNet-18 with BatchNorm);
* ``sweep``: one-at-a-time sweeps of MTT+MIM's knobs (lambda, tau, head, critic, n_real on digits;
  layers and beta on mnist5k, whose ConvNet-3 has three layers to weigh);
* ``lambda_x_lr``: lambda x lr_img, to see whether lambda's effect is just a larger image step.

Budgets (iterations, widths, real batch sizes) are set per dataset so that the default study fits in
two hours on two CPU cores; ``docs/results.md`` states them beside the tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ablation import Cell, make_cells, run_sweep
from .settings import merge_layers
from .stats import format_difference, format_interval, holm, mean_ci, paired_compare

BASES = ("dc", "dm", "mtt")
ARCHS = ("mlp", "lenet", "resnet18")  # besides the ConvNet every run is evaluated with

# What changes per dataset: the study's budget (see the module docstring). MTT's settings come from the
# dataset's preset (mtt-<dataset>-ipc<N>); DC and DM get a ConvNet of the same width.
BUDGET: dict[str, dict[str, Any]] = {
    "digits": {"evals": 2, "eval": {"epochs": 300, "resnet_width": 16},
               "dc": {"iterations": 40, "method_config": {"width": 32, "batch_real": 64}},
               "dm": {"iterations": 200, "method_config": {"width": 32, "batch_real": 64}}},
    "mnist5k": {"evals": 2, "eval": {"epochs": 100, "width": 64, "resnet_width": 16},
                "dc": {"iterations": 10, "method_config": {"width": 32, "batch_real": 32, "inner_loop": 10}},
                "dm": {"iterations": 60, "method_config": {"width": 32, "batch_real": 64}}},
}
QUICK_ITERATIONS = {"dc": 10, "dm": 40, "mtt": 30}


@dataclass(frozen=True)
class Part:
    """One sweep of the study: a base setting, a grid over it, and how its runs are evaluated."""

    kind: str  # "methods" | "sweep" | "lambda_x_lr"
    dataset: str
    ipc: int
    method: str
    grid: dict[str, list[str]] = field(default_factory=dict)
    one_at_a_time: bool = True
    archs: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.dataset}/ipc{self.ipc}/{self.method}"


def base_layer(part: Part, quick: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings layer every cell of ``part`` starts from: preset, study budget, the part's identity
    (``overrides``, a settings layer, last: e.g. fewer iterations for a smoke test)."""
    from .methods.registry import resolve
    from .presets import default_preset, preset_layer_for

    choice = resolve(part.method)
    preset = default_preset(choice, part.dataset, part.ipc)
    budget = BUDGET[part.dataset]
    own = budget.get(choice.spec.name, {})
    # One expert buffer per dataset, shared by every distillation seed (as MTT's buffer is trained once);
    # each seed still draws its own initial images, expert/epoch samples, DSA and heads.
    layer = merge_layers(preset_layer_for(preset, choice) if preset else {},
                         {"evals": budget["evals"], "eval": budget["eval"], "expert_seed": 0}, own,
                         {"method": part.method, "dataset": part.dataset, "ipc": part.ipc, "device": "cpu"})
    if quick:
        layer["iterations"] = min(int(layer.get("iterations", 200)), QUICK_ITERATIONS[choice.spec.name])
    return merge_layers(layer, overrides or {})


def plan(quick: bool = False) -> list[Part]:
    """The study's parts (the default study, or the --quick one that checks everything in minutes)."""
    if quick:
        methods = [Part("methods", "digits", 1, m, archs=("mlp",)) for b in BASES for m in (b, f"{b}+mim")]
        # the grid holds mtt+mim's default lambda (3), which every sweep compares against
        return methods + [Part("sweep", "digits", 1, "mtt+mim", {"lambda": ["0", "1", "3"]})]
    parts = [Part("methods", ds, ipc, m, archs=ARCHS)
             for ds in ("digits", "mnist5k") for ipc in (1, 10) for b in BASES for m in (b, f"{b}+mim")]
    parts.append(Part("sweep", "digits", 1, "mtt+mim", {
        "lambda": ["0", "0.03", "0.1", "0.3", "1", "3", "10"], "tau": ["0.05", "0.1", "0.2", "0.5"],
        "head": ["identity", "linear", "mlp"], "critic": ["infonce", "nce"], "n_real": ["8", "32", "64"]}))
    parts.append(Part("sweep", "mnist5k", 1, "mtt+mim", {
        "layers": ["blocks.0", "blocks.1", "blocks.2", "all"], "beta": ["uniform", "geometric:0.5", "geometric:2"]}))
    parts.append(Part("lambda_x_lr", "digits", 1, "mtt+mim", {"lambda": ["0", "0.3", "3"],
                                                               "lr_img": ["50", "100", "200"]}, one_at_a_time=False))
    return parts


def run_study(parts: list[Part], seeds: list[int], out: Path, *, quick: bool = False, workers: int = 1,
              console=None, overrides: dict[str, Any] | None = None) -> dict[str, list[dict]]:
    """Every part's cells (cached under ``out``): part name -> results in cell order."""
    results = {}
    for part in parts:
        cells = make_cells(part.grid, seeds, one_at_a_time=part.one_at_a_time) if part.grid else \
            [Cell((), s) for s in seeds]
        results[part.name] = run_sweep(cells, base_layer(part, quick, overrides), out, workers=workers, console=console,
                                       archs=part.archs, title=part.name)
    return results


# -- analysis ----------------------------------------------------------------------------------------


def _by_seed(rows: list[dict], key: str = "accuracy_mean") -> dict[int, float]:
    return {r["seed"]: float(r[key]) for r in rows}


def _paired(a: dict[int, float], b: dict[int, float]):
    seeds = sorted(set(a) & set(b))
    return paired_compare([a[s] for s in seeds], [b[s] for s in seeds])


def method_rows(parts: list[Part], results: dict[str, list[dict]]) -> list[dict]:
    """Per dataset, IPC and base method: test accuracy of both variants, the paired difference (test
    and validation), the cost ratio from the same runs, and the cross-architecture differences."""
    rows = []
    for part in parts:
        if part.kind != "methods" or part.method.endswith("+mim"):
            continue
        plain = results[part.name]
        term = results[Part("methods", part.dataset, part.ipc, f"{part.method}+mim", archs=part.archs).name]
        test_plain, test_term = _by_seed(plain), _by_seed(term)
        row = {"dataset": part.dataset, "ipc": part.ipc, "method": part.method,
               "plain": mean_ci(list(test_plain.values())), "term": mean_ci(list(test_term.values())),
               "diff_test": _paired(test_term, test_plain),
               "diff_val": _paired(_by_seed(term, "val_accuracy_mean"), _by_seed(plain, "val_accuracy_mean")),
               # CPU seconds of the distillation (one thread per cell): parallel cells do not distort it
               "cost_ratio": (sum(r["distill_cpu_seconds"] for r in term)
                              / max(1e-9, sum(r["distill_cpu_seconds"] for r in plain))),
               "archs": {}}
        for arch in part.archs:
            a = {r["seed"]: r["archs"][arch] for r in plain}
            b = {r["seed"]: r["archs"][arch] for r in term}
            row["archs"][arch] = {"plain": mean_ci(list(a.values())), "term": mean_ci(list(b.values())),
                                  "diff": _paired(b, a)}
        rows.append(row)
    return rows


def sweep_rows(part: Part, results: list[dict], quick: bool = False,
               overrides: dict[str, Any] | None = None) -> list[dict]:
    """Per swept parameter: per value, validation and test accuracy over seeds, the MI estimate, and the
    paired effects from the default on validation (``ablation.one_at_a_time_effects``)."""
    from .ablation import one_at_a_time_effects

    out = []
    for e in one_at_a_time_effects(results, part.grid, base_layer(part, quick, overrides)):
        by_value = {v: [r for r in results if r["params"] == {e["param"]: v}] for v in e["values"]}
        out.append({**e, "val": {v: mean_ci([r["val_accuracy_mean"] for r in rs]) for v, rs in by_value.items()},
                    "test": {v: mean_ci([r["accuracy_mean"] for r in rs]) for v, rs in by_value.items()},
                    "mi": {v: _mean_mi(rs) for v, rs in by_value.items()}})
    return out


def _mean_mi(rows: list[dict]) -> float:
    values = [sum(r["mi_est"].values()) / len(r["mi_est"]) for r in rows if r.get("mi_est")]
    return sum(values) / len(values) if values else math.nan


def choose_default(row: dict) -> tuple[str, str]:
    """The protocol's rule: the value with the best validation mean replaces the default only if its
    paired difference from the default is detectable (the interval excludes zero); returns (value, why)."""
    best = max(row["values"], key=lambda v: row["val"][v].mean)
    if best == row["default"]:
        return best, "the default has the best validation accuracy"
    effect = next(e for e in row["effects"].effects if e.setting == best)
    if effect.diff.low > 0:
        return best, f"{best} beats the default on validation by {format_difference(effect.diff, scale=100)}"
    return row["default"], (f"the best on validation ({best}) is not detectably better than the default "
                            f"({format_difference(effect.diff, scale=100)}): default kept")


# -- the report ---------------------------------------------------------------------------------------


def _pct(iv) -> str:
    return format_interval(iv, digits=1, scale=100)


def _diff(c) -> str:
    return f"{format_difference(c.diff, digits=2, scale=100)} (p = {c.p_value:.3f})"


def write_results(parts: list[Part], results: dict[str, list[dict]], out_md: Path, *, command: str,
                  wall_seconds: float, seeds: list[int], quick: bool, img_dir: Path, workers: int = 1) -> Path:
    """docs/results.md: every table of the study, generated (never typed) from the cached cells."""
    from .io import atomic_write_text

    cells = {r["key"]: r for rs in results.values() for r in rs}  # a cell shared by two parts counts once
    cell_minutes = sum(r["distill_seconds"] + r["eval_seconds"] for r in cells.values()) / 60
    lines = ["# Results: does the MI term help, by how much, at what cost", "",
             f"Generated by `{command}` ({len(seeds)} distillation seeds: {seeds}). The {len(cells)} cells took "
             f"{cell_minutes:.0f} worker-minutes of distillation and evaluation (wall time of each cell, summed; "
             f"on {workers} worker(s) about {cell_minutes / workers:.0f} min); "
             f"this invocation ran {wall_seconds / 60:.1f} min "
             "(cells cached by an earlier invocation are read, not rerun). "
             "Every accuracy is the mean over distillation seeds "
             "with its 95 % t interval; differences are paired on the same seeds (paired t interval and "
             "p-value); settings are chosen on the validation split, tables report the test split. "
             "\"no detectable effect\" means the interval covers zero.", ""]
    rows = method_rows(parts, results)
    if rows:
        lines += ["## 1. Each base method with and without the term (test accuracy, %)", "",
                  "| dataset | IPC | method | without | with +mim | +mim minus without (test) | (validation) | "
                  "CPU time ratio |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['dataset']} | {r['ipc']} | {r['method']} | {_pct(r['plain'])} | {_pct(r['term'])} | "
                         f"{_diff(r['diff_test'])} | {_diff(r['diff_val'])} | {r['cost_ratio']:.2f}x |")
        archs = sorted({a for r in rows for a in r["archs"]})
        if archs:
            lines += ["", "### Cross-architecture: the same distilled sets, other evaluation networks (test, %)",
                      "", "| dataset | IPC | method | architecture | without | with +mim | difference |",
                      "|---|---|---|---|---|---|---|"]
            for r in rows:
                for a in archs:
                    x = r["archs"][a]
                    lines.append(f"| {r['dataset']} | {r['ipc']} | {r['method']} | {a} | {_pct(x['plain'])} | "
                                 f"{_pct(x['term'])} | {_diff(x['diff'])} |")
    for part in parts:
        if part.kind == "methods":
            continue
        if part.kind == "sweep":
            sweeps = sweep_rows(part, results[part.name], quick)
            lines += ["", f"## 2. One at a time: {part.method} on {part.dataset}, IPC {part.ipc}", ""]
            for s in sweeps:
                value, why = choose_default(s)
                lines += [f"### {s['param']} (default {s['default']}; no-effect permutation p = "
                          f"{s['effects'].p_no_effect:.3f}, Holm-adjusted {s['p_no_effect_holm']:.3f}; "
                          f"chosen: {value}, because {why})", "",
                          "| value | validation % | test % | minus default (validation) | MI estimate (nats) |",
                          "|---|---|---|---|---|"]
                effects = {e.setting: e for e in s["effects"].effects}
                for v in s["values"]:
                    d = "(default)" if v == s["default"] else format_difference(effects[v].diff, digits=2, scale=100)
                    lines.append(f"| {s['param']}={v} | {_pct(s['val'][v])} | {_pct(s['test'][v])} | {d} | "
                                 f"{s['mi'][v]:.3f} |")
                lines.append("")
        else:
            lines += ["", f"## 3. lambda x lr_img: {part.method} on {part.dataset}, IPC {part.ipc} (validation, %)",
                      ""] + _product_table(part, results[part.name])
    lines += ["", f"Cells cached under the study's output folder; plots in `{img_dir.as_posix()}`.", ""]
    atomic_write_text(out_md, "\n".join(lines))
    return out_md


def _product_table(part: Part, results: list[dict]) -> list[str]:
    (p1, v1), (p2, v2) = part.grid.items()
    cell = {}
    for a in v1:
        for b in v2:
            cell[(a, b)] = mean_ci([r["val_accuracy_mean"] for r in results if r["params"] == {p1: a, p2: b}])
    lines = [f"| {p1} \\ {p2} | " + " | ".join(v2) + " |", "|---|" + "---|" * len(v2)]
    for a in v1:
        lines.append(f"| {a} | " + " | ".join(_pct(cell[(a, b)]) for b in v2) + " |")
    return lines


def save_json(results: dict[str, list[dict]], path: Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=1, sort_keys=True, default=str))


# -- plots and guidelines ---------------------------------------------------------------------------


def write_plots(parts: list[Part], results: dict[str, list[dict]], img_dir: Path, *, quick: bool = False) -> list[Path]:
    """PNG figures of the study (Agg): methods with and without the term, and each swept parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    rows = method_rows(parts, results)
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 3.6))
        labels = [f"{r['dataset']}\nIPC {r['ipc']}\n{r['method']}" for r in rows]
        for k, (key, name) in enumerate((("plain", "without"), ("term", "with +mim"))):
            means = [100 * r[key].mean for r in rows]
            errs = [100 * r[key].half_width if math.isfinite(r[key].half_width) else 0 for r in rows]
            ax.bar([i + (k - 0.5) * 0.38 for i in range(len(rows))], means, width=0.38, yerr=errs, capsize=3,
                   label=name)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("test accuracy (%), 95% CI over seeds")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(img_dir / "methods.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    for part in parts:
        if part.kind != "sweep":
            continue
        for s in sweep_rows(part, results[part.name], quick):
            fig, ax = plt.subplots(figsize=(5, 3.2))
            xs = range(len(s["values"]))
            for split in ("val", "test"):
                ivs = [s[split][v] for v in s["values"]]
                ax.errorbar(xs, [100 * iv.mean for iv in ivs],
                            yerr=[100 * iv.half_width if math.isfinite(iv.half_width) else 0 for iv in ivs],
                            marker="o", capsize=3, label="validation" if split == "val" else "test")
            ax.set_xticks(list(xs), s["values"])
            ax.set_xlabel(f"{s['param']} (default {s['default']})")
            ax.set_ylabel("accuracy (%), 95% CI")
            ax.set_title(f"{part.method} on {part.dataset}, IPC {part.ipc}", fontsize=9)
            ax.legend(fontsize=8)
            fig.tight_layout()
            written.append(img_dir / f"{part.dataset}_{s['param']}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written


def write_guidelines(parts: list[Part], results: dict[str, list[dict]], path: Path, *, results_md: str) -> Path:
    """docs/guidelines.md from the study: every sentence that states an effect cites its row of the results,
    and says "no detectable effect" where the interval covers zero."""
    from .io import atomic_write_text

    lines = ["# Guidelines: when the MI term helps, and which knobs matter", "",
             f"Generated from the study ({results_md}); each statement cites the row it rests on. An effect is "
             "stated only with its 95 % interval over distillation seeds, paired on the same seeds.", "",
             "## Adding the term to a base method", ""]
    rows = method_rows(parts, results)
    adjusted = holm([r["diff_test"].p_value for r in rows]) if rows else []
    if rows:
        lines += [f"{len(rows)} paired comparisons (paired t on the test split); the Holm-adjusted p-value over all "
                  f"of them is given beside each, since at 5 % about {0.05 * len(rows):.1f} of {len(rows)} would "
                  "exclude zero by chance alone.", ""]
    for r, p_holm in zip(rows, adjusted, strict=True):
        verdict = "no detectable effect" if not r["diff_test"].detectable else (
            "helps" if r["diff_test"].diff.mean > 0 else "hurts")
        lines.append(f"- {r['method']} on {r['dataset']}, IPC {r['ipc']}: {verdict} "
                     f"(test accuracy {format_interval(r['diff_test'].diff, 2, 100, sign=True)} points, "
                     f"p = {r['diff_test'].p_value:.3f}, Holm {p_holm:.3f}; "
                     f"{r['cost_ratio']:.2f}x the distillation time; {results_md} section 1, row "
                     f"{r['dataset']} / {r['ipc']} / {r['method']}).")
    lines += ["", "## The term's knobs (chosen on validation)", ""]
    for part in parts:
        if part.kind != "sweep":
            continue
        for s in sweep_rows(part, results[part.name]):
            value, why = choose_default(s)
            matters = s["p_no_effect_holm"] < 0.05
            # a single value's paired interval can exclude zero while the parameter-level test, corrected for
            # the number of parameters swept, cannot reject "no effect": say both rather than one
            apart = [e for e in s["effects"].effects if not e.diff.covers(0.0)]
            verdict = "matters" if matters else (
                "no detectable effect" if not apart else
                "not detectable after correcting for the parameters swept, although "
                + ", ".join(f"{e.setting} differs from the default by {format_interval(e.diff, 2, 100, sign=True)}"
                            " validation points" for e in apart))
            lines.append(f"- {s['param']} ({part.dataset}, IPC {part.ipc}): "
                         f"{verdict} (no-effect permutation p = "
                         f"{s['effects'].p_no_effect:.3f}, Holm {s['p_no_effect_holm']:.3f}); use {value}: {why} "
                         f"({results_md} section 2, {s['param']}).")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
