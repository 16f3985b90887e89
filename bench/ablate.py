"""Ablation and sensitivity sweeps of MIM4DD: `python bench/ablate.py [--grid name=v1,v2 ...]`.

Without --grid it runs the default one-at-a-time sweep (tau, beta, head, critic, lambda around the
defaults) on the embedded digits; several --grid flags form a product grid (two give a heatmap).
Finished cells are cached under OUT/cells: rerun the same command to resume an interrupted sweep.

Scale-out: `torchrun --standalone --nproc-per-node N bench/ablate.py ...` splits the pending cells
round-robin over N processes (MTT experts are built first, collectively); rank 0 gathers the results,
prints and writes the report. OUT must be on a filesystem all ranks share. A rerun, under any number of
processes, skips the cells already cached. A rank that finishes its cells early waits for the others
at most --dist-timeout seconds: set it above the time of the slowest rank's last cell. --workers > 1
cannot be combined with torchrun (exit 2): use --nproc-per-node for parallel cells instead.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rich.console import Console

from mim4dd_fast.ablation import (
    DEFAULT_SWEEP,
    cell_settings,
    make_cells,
    parse_grid_args,
    parse_grid_file,
    run_sweep,
    write_report,
)
from mim4dd_fast.distributed import init_from_env, launched_distributed
from mim4dd_fast.errors import OneSentenceParser, UserError, run_command

console = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneSentenceParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", action="append", default=[], help="name=v1,v2 (repeat for a product grid)")
    p.add_argument("--grid-file", default=None, help="TOML file with a [grid] table")
    p.add_argument("--one-at-a-time", action="store_true", help="vary one parameter at a time (default sweep)")
    p.add_argument("--method", default="mtt+mim", help="a +mim method: mtt+mim (default), dc+mim, dm+mim")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--iterations", type=int, default=None, help="distillation iterations per cell (preset default)")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds")
    p.add_argument("--evals", type=int, default=3, help="evaluation nets per cell")
    p.add_argument("--eval-epochs", type=int, default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="any other setting, as `mim4dd-fast distill --set` (e.g. method.lr_img=100)")
    p.add_argument("--workers", type=int, default=1,
                   help="cells run in parallel processes (single-process launch only; under torchrun use "
                        "--nproc-per-node instead, --workers > 1 is refused)")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: seconds a rank waits for the others before it stops with an error "
                        "(default $MIM4DD_DIST_TIMEOUT or 1800)")
    p.add_argument("--out", default="runs/ablation", help="output directory (cache, report, plots)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_command(lambda: _run(parser.parse_args(argv), argv),
                       interrupted="interrupted; rerun the same command to resume from the cached cells.")


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    from mim4dd_fast.methods.registry import resolve
    from mim4dd_fast.presets import default_preset, preset_layer_for
    from mim4dd_fast.settings import merge_layers, parse_overrides

    if args.workers < 1 or args.evals < 1 or args.ipc < 1:
        raise UserError("--workers, --evals and --ipc must each be at least 1.")
    if args.workers > 1 and launched_distributed():
        raise UserError("--workers > 1 cannot be combined with torchrun; use --nproc-per-node for parallel cells.")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be a comma list of integers, got {args.seeds!r}.") from None
    if not seeds:
        raise UserError("--seeds must name at least one seed.")
    choice = resolve(args.method)
    if not choice.with_term:
        raise UserError(f"Ablations sweep the MIM term; use a +mim method, not {args.method!r}.")
    if args.grid_file:
        grid, one = parse_grid_file(args.grid_file), args.one_at_a_time
    elif args.grid:
        grid, one = parse_grid_args(args.grid), args.one_at_a_time
    else:
        grid, one = parse_grid_args([f"{k}={','.join(v)}" for k, v in DEFAULT_SWEEP.items()]), True
    preset = args.preset or default_preset(choice, args.dataset, args.ipc)
    base = merge_layers(preset_layer_for(preset, choice) if preset else {}, {
        "method": args.method, "dataset": args.dataset, "data_dir": args.data_dir or "", "ipc": args.ipc,
        "evals": args.evals, **({"iterations": args.iterations} if args.iterations else {}),
        **({"eval": {"epochs": args.eval_epochs}} if args.eval_epochs else {})}, parse_overrides(args.set))
    cells = make_cells(grid, seeds, one_at_a_time=one)
    for cell in cells:  # validate every cell before any work (every rank sees the same flags, so all fail alike)
        cell_settings(cell, base)
    dist = init_from_env(args.dist_timeout, "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        ranks = f"; {dist.world_size} ranks" if dist.enabled else ""
        console.print(f"{len(cells)} cells ({'one at a time' if one else 'product'} over {', '.join(grid)}; "
                      f"seeds {seeds}{ranks}) -> {out}")
    results = run_sweep(cells, base, out, workers=args.workers, console=console, dist=dist)
    if results is None:  # not rank 0: its cells are cached and were gathered by rank 0
        return 0
    launcher = f"torchrun --nproc-per-node {dist.world_size} " if dist.enabled else "python "
    command = launcher + "bench/ablate.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = write_report(results, grid, out, title=f"MIM4DD ablation: {args.method} on {args.dataset}, "
                          f"IPC {args.ipc}", command=command.strip(), one_at_a_time=one)
    Console().print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
