"""The evidence study (docs/results.md): `python bench/study.py` (about 2 h on 2 cores), `--quick` (minutes).

Each base method with and without the MI term on digits and mnist5k at IPC 1 and 10 (with
cross-architecture evaluation), one-at-a-time sweeps of the term's knobs and lambda x lr_img, every
cell over --seeds distillation seeds, compared paired on the same seeds, chosen on the validation
split and reported on the test split. Cells are cached under --out: rerun the same command to resume;
--workers runs cells in parallel processes (one thread each). Writes the report (--report) and its
plots (next to it, under img/results/), and the raw cells as JSON (OUT/study.json).

    python bench/study.py --quick --out runs/study-quick --report runs/study-quick/results.md
    python bench/study.py                           # the default study -> docs/results.md
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Parser  # noqa: E402


def build_parser() -> Parser:
    p = Parser(prog="bench/study.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="digits IPC 1 only, 3 seeds, short runs (minutes)")
    p.add_argument("--seeds", type=int, default=None, help="distillation seeds per cell (default 6; --quick 3)")
    p.add_argument("--workers", type=int, default=2, help="cells in parallel processes, one thread each")
    p.add_argument("--out", default="runs/study", help="cache of finished cells (rerun to resume)")
    p.add_argument("--report", default="docs/results.md", help="the Markdown report to write")
    p.add_argument("--iterations", type=int, default=None, help="override every cell's iterations (smoke tests)")
    p.add_argument("--eval-epochs", type=int, default=None, help="override every cell's evaluation epochs")
    return p


def main(argv: list[str] | None = None) -> int:
    from mim4dd_fast.errors import run_command

    return run_command(lambda: _main(argv), interrupted="interrupted; rerun the same command to resume.")


def _main(argv: list[str] | None) -> int:
    from rich.console import Console

    from mim4dd_fast.errors import UserError
    from mim4dd_fast.io import check_writable_dir
    from mim4dd_fast.study import plan, run_study, save_json, write_guidelines, write_plots, write_results

    args = build_parser().parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (3 if args.quick else 6)
    if seeds < 2 or args.workers < 1:
        raise UserError("--seeds must be at least 2 (an interval needs two) and --workers at least 1.")
    if (args.iterations is not None and args.iterations < 1) or (args.eval_epochs is not None and args.eval_epochs < 1):
        raise UserError("--iterations and --eval-epochs must be at least 1.")
    overrides = {**({"iterations": args.iterations} if args.iterations else {}),
                 **({"eval": {"epochs": args.eval_epochs}} if args.eval_epochs else {})}
    out, report = Path(args.out), Path(args.report)
    check_writable_dir(out)
    check_writable_dir(report.parent)  # before any work: the finished study must have somewhere to go
    console = Console(stderr=True)
    parts = plan(args.quick)
    t0 = time.perf_counter()
    results = run_study(parts, list(range(seeds)), out, quick=args.quick, workers=args.workers, console=console,
                        overrides=overrides)
    wall = time.perf_counter() - t0
    save_json(results, out / "study.json")
    command = "python bench/study.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    img = report.parent / "img" / "results"
    write_plots(parts, results, img, quick=args.quick)
    write_results(parts, results, report, command=command.strip(), wall_seconds=wall, seeds=list(range(seeds)),
                  quick=args.quick, img_dir=img, workers=args.workers)
    if not args.quick:
        write_guidelines(parts, results, report.parent / "guidelines.md", results_md=report.name)
    Console().print(f"report: {report} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
