"""`mim4dd-fast` command line: distill | experts | evaluate | show.

Every user error (bad path, file, config, flag or hyperparameter) is printed as one sentence and the
process exits with code 2; no traceback reaches the user. Nothing heavy is imported before
``run_command`` is in charge, so a Ctrl-C in the first second is "interrupted." too.
"""

from __future__ import annotations

import argparse
import sys

from .errors import OneSentenceParser, UserError, run_command


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def _stdout():
    from rich.console import Console

    return Console()


def _at_least(args: argparse.Namespace, *flags: str) -> None:
    for flag in flags:
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}.")


def _check_seed(args: argparse.Namespace) -> None:
    from .bounds import check_seed

    check_seed(args.seed, "--seed")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits",
                   help="digits | mnist5k (both embedded) | cifar10 | cifar100 | mnist | fashion-mnist | "
                   "imagefolder:PATH")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset files")
    p.add_argument("--image-size", type=int, default=None, help="resize square images to this size")
    p.add_argument("--zca", action="store_true", help="ZCA-whiten (fitted on the training split)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)


def _device(name: str) -> str:
    from .runner import resolve_device

    return resolve_device(name)


def _add_dist_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: seconds a rank waits for the others before it stops with an error "
                        "(default $MIM4DD_DIST_TIMEOUT or 1800)")


def _join(args: argparse.Namespace, device: str):
    """Join the torchrun job when launched by torchrun (else a single-process Dist); returns (dist, device)."""
    from .distributed import init_from_env, rank_device

    dist = init_from_env(getattr(args, "dist_timeout", None), device)
    if not dist.is_main:  # every rank reads the same data: rank 0 alone reports warnings about it
        import warnings

        warnings.simplefilter("ignore")
    return dist, rank_device(device, dist)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from .bounds import check_data_memory
    from .data import load_dataset
    from .evaluation import EvalConfig, random_baseline
    from .rundir import check_output_file

    _at_least(args, "nets", "epochs", "image_size")
    _check_seed(args)
    check_output_file(args.json, "--json")
    if args.run_dir is not None:
        return _cmd_evaluate_run(args)
    if not args.random:
        raise UserError("Give --random to evaluate the random-real baseline, or a run directory to evaluate it.")
    if args.ipc < 1:
        raise UserError(f"--ipc must be at least 1, got {args.ipc}.")
    device = _device(args.device)
    check_data_memory(args.dataset, args.data_dir, args.image_size)
    dataset = load_dataset(args.dataset, args.data_dir, image_size=args.image_size, zca=args.zca, seed=args.seed)
    dataset.class_index.check_ipc(args.ipc)
    cfg = EvalConfig(epochs=args.epochs if args.epochs else EvalConfig.epochs, n_nets=args.nets)
    with Progress(console=_stderr(), transient=True) as progress:
        task = progress.add_task(f"random real, IPC {args.ipc}", total=cfg.n_nets)
        result = random_baseline(dataset, args.ipc, cfg, seed=args.seed, device=device,
                                 progress=lambda i, acc: progress.advance(task))
    _stdout().print(
        f"random real subset, {args.dataset} IPC {args.ipc}: accuracy {100 * result['mean']:.2f}% "
        f"± {100 * result['std']:.2f}% over {cfg.n_nets} nets"
    )
    if args.json:
        from .io import atomic_write_json

        atomic_write_json(args.json, {"dataset": args.dataset, "ipc": args.ipc, "kind": "random", **result})
    return 0


_RUN_FLAGS = ("method", "dataset", "data_dir", "ipc", "iterations", "seed", "image_size", "device",
              "eval_every", "checkpoint_every", "evals", "num_experts", "init")


def _layers_from_args(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """The layers the user gave: --config file, explicit flags (only those given), --set items."""
    from .settings import parse_overrides, read_toml

    flags = {k: getattr(args, k) for k in _RUN_FLAGS if getattr(args, k, None) is not None}
    if args.zca:
        flags["zca"] = True
    if "data_dir" in flags:
        flags["data_dir"] = str(flags["data_dir"])
    mim = {k: getattr(args, k) for k in ("lam", "tau") if getattr(args, k) is not None}
    if mim:
        flags["mim"] = mim
    file_layer = read_toml(args.config) if args.config else {}
    return file_layer, flags, parse_overrides(args.set)


def _settings_from_args(args: argparse.Namespace):
    """defaults < preset < --config file < explicit flags (only flags the user gave) < --set items.

    With --resume: the run's own config.toml < preset (if given) < --config < flags < --set, so repeating
    the command that started the run changes nothing; production.distill refuses any change but the
    safe keys (iterations, eval_every, ...), naming the keys.
    """
    from .settings import resolve_settings, settings_on

    layers = _layers_from_args(args)
    if args.resume:
        from .production import load_settings_from_run

        return settings_on(load_settings_from_run(args.out), *layers, preset=args.preset)
    _, settings = resolve_settings(*layers, preset=args.preset)
    return settings


def _cmd_distill(args: argparse.Namespace) -> int:
    from .production import Interrupted, distill

    if str(args.out).strip() == "":
        raise UserError("--out is empty; give the run directory's path.")
    settings = _settings_from_args(args)
    dist, _ = _join(args, _device(settings.run.device))
    console = _stderr()
    try:
        result = distill(settings, args.out, resume=args.resume, console=console, dist=dist)
    except Interrupted as exc:
        if dist.is_main:
            console.print(f"stopped by {exc}; the last checkpoint is saved: continue with "
                          f"`mim4dd-fast distill --out {args.out} --resume`.")
        return 128 + exc.signum
    if not dist.is_main:
        return 0
    _stdout().print(f"{settings.run.method} on {settings.run.dataset}, IPC {settings.run.ipc}: accuracy "
                    f"{100 * result['mean']:.2f}% ± {100 * result['std']:.2f}% over {len(result['accuracies'])} "
                    f"nets; run saved in {args.out} (picture: {args.out}/synthetic.png)")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    """Print what can be read; name, in one closing sentence (exit 2), every file that cannot."""
    from pathlib import Path

    from rich.table import Table

    from .rundir import inspect_run

    out = Path(args.run_dir)
    report = inspect_run(out)
    table = Table(title=f"run {out}")
    table.add_column("what")
    table.add_column("value")
    for what, value in report.rows:
        table.add_row(what, value)
    _stdout().print(table)
    if report.problems:
        more = f" (and {len(report.problems) - 1} more problem(s))" if len(report.problems) > 1 else ""
        raise UserError(f"{report.problems[0]}{more}")
    return 0


def _cmd_evaluate_run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from .evaluation import evaluate_synthetic
    from .production import load_settings_from_run
    from .rundir import read_manifest, read_synthetic
    from .runner import load_run_dataset, resolve_device

    out = Path(args.run_dir)
    if args.json and out.resolve() in Path(args.json).resolve().parents:
        raise UserError(f"--json {args.json} is inside the run directory {out}, whose files are checksummed; write "
                        "it elsewhere.")
    settings = load_settings_from_run(out)
    tensors = read_synthetic(out, read_manifest(out))
    dataset = load_run_dataset(settings.run)
    cfg = dataclasses.replace(settings.eval, n_nets=args.nets, **({"epochs": args.epochs} if args.epochs else {}))
    lr = float(tensors["syn_lr"].flatten()[0]) if "syn_lr" in tensors else None
    device = resolve_device(args.device)
    result = evaluate_synthetic(tensors["images"], tensors["labels"], dataset, cfg, seed=args.seed, device=device,
                                lr=lr)
    _stdout().print(f"{out}: accuracy {100 * result['mean']:.2f}% ± {100 * result['std']:.2f}% over {args.nets} "
                    "nets")
    if args.json:
        from .io import atomic_write_json

        atomic_write_json(args.json, {"run": str(out), **result})
    return 0


def _check_experts_out(path: str) -> None:
    """--out of `experts` is new, empty or an expert directory (manifest.json of experts, or pending/)."""
    from pathlib import Path

    from .errors import DataError
    from .experts import MANIFEST, PENDING, _read_manifest
    from .rundir import check_output_dir

    out = check_output_dir(path, "--out")
    if not out.is_dir():
        return
    entries = [p.name for p in out.iterdir()]
    if not entries:
        return
    if (out / MANIFEST).is_file():
        try:
            _read_manifest(out)
            return  # an expert directory: finished or extended in place
        except DataError:
            if any(n.startswith("expert_") for n in entries):
                raise  # our damaged manifest: its own sentence says what to do
            # else someone else's manifest.json: not ours to overwrite
    if set(entries) <= {PENDING} or all(n.startswith("expert_") or n == PENDING for n in entries):
        return
    raise UserError(f"--out {Path(path)} already exists and holds files that are not expert trajectories "
                    f"({', '.join(sorted(entries)[:3])}{', ...' if len(entries) > 3 else ''}); choose a new or "
                    "empty folder.")


def _cmd_experts(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from .bounds import check_data_memory, check_memory, expert_needs
    from .data import load_dataset
    from .experts import train_experts
    from .models import default_depth

    _at_least(args, "num_experts", "epochs", "batch_size", "width", "depth", "image_size", "experts_per_pass")
    if not args.lr > 0 or args.lr != args.lr or args.lr == float("inf"):
        raise UserError(f"--lr must be a positive finite number, got {args.lr}.")
    _check_seed(args)
    _check_experts_out(args.out)
    dist, device = _join(args, _device(args.device))  # under torchrun the ranks split the experts
    check_data_memory(args.dataset, args.data_dir, args.image_size)
    dataset = load_dataset(args.dataset, args.data_dir, image_size=args.image_size, zca=args.zca, seed=args.seed)
    model_kwargs = {"width": args.width, "depth": args.depth or default_depth(dataset.image_size)}
    check_memory(expert_needs(dataset, num_experts=args.num_experts, epochs=args.epochs, batch_size=args.batch_size,
                              model_kwargs=model_kwargs), str(device), "lower --width, --batch-size or --epochs")
    share = f" (rank 0 of {dist.world_size}, its own share)" if dist.enabled else ""
    with Progress(console=_stderr(), disable=not dist.is_main) as progress:  # only rank 0 draws
        task = progress.add_task(f"experts{share}", total=None if dist.enabled else args.num_experts * args.epochs)

        def report(k: int, epoch: int, epochs: int) -> None:
            if dist.enabled:  # rank 0 sees only the experts it trains itself
                progress.update(task, description=f"expert {k + 1}/{args.num_experts}, epoch {epoch}/{epochs}{share}")
            else:
                progress.update(task, completed=k * epochs + epoch, description=f"expert {k + 1}/{args.num_experts}")

        paths = train_experts(dataset, args.out, num_experts=args.num_experts, epochs=args.epochs, seed=args.seed,
                              lr=args.lr, batch_size=args.batch_size, dsa=not args.no_dsa,
                              model_kwargs=model_kwargs, device=device, progress=report, dist=dist,
                              **({"experts_per_pass": args.experts_per_pass} if args.experts_per_pass else {}))
    if dist.is_main:
        ranks = f" ({dist.world_size} ranks)" if dist.enabled else ""
        _stdout().print(f"{len(paths)} expert trajectories ({args.epochs} epochs each) in {args.out}{ranks}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneSentenceParser(prog="mim4dd-fast",
                               description="Fast, measured dataset distillation (MIM4DD, MTT, DC, DM).")
    sub = parser.add_subparsers(dest="command", parser_class=OneSentenceParser)

    ev = sub.add_parser("evaluate", help="evaluate the random-real baseline or a saved run")
    ev.add_argument("run_dir", nargs="?", default=None, help="a distillation run directory to evaluate")
    _add_data_args(ev)
    ev.add_argument("--ipc", type=int, default=1)
    ev.add_argument("--random", action="store_true", help="evaluate a random real subset at this IPC")
    ev.add_argument("--nets", type=int, default=5, help="number of fresh evaluation nets")
    ev.add_argument("--epochs", type=int, default=None, help="training epochs per evaluation net")
    ev.add_argument("--json", default=None, help="write the result as JSON here")
    ev.set_defaults(func=_cmd_evaluate)

    di = sub.add_parser("distill", help="distil a dataset into RUN_DIR (resumable, checkpointed)")
    di.add_argument("--method", default=None, help="dc | dm | mtt | dc+mim | dm+mim | mtt+mim | mim4dd")
    di.add_argument("--dataset", default=None)
    di.add_argument("--data-dir", default=None)
    di.add_argument("--ipc", type=int, default=None)
    di.add_argument("--out", required=True, help="the run directory")
    di.add_argument("--preset", default=None, help="a preset from mim4dd_fast/presets/, e.g. mtt-cifar10-ipc10")
    di.add_argument("--config", default=None, help="a TOML settings file (e.g. another run's config.toml)")
    di.add_argument("--iterations", type=int, default=None)
    di.add_argument("--eval-every", type=int, default=None, help="evaluate one net every K iterations")
    di.add_argument("--checkpoint-every", type=int, default=None)
    di.add_argument("--evals", type=int, default=None, help="evaluation nets at the end")
    di.add_argument("--num-experts", type=int, default=None, help="MTT expert trajectories")
    di.add_argument("--init", default=None, choices=["real", "noise"])
    di.add_argument("--image-size", type=int, default=None)
    di.add_argument("--zca", action="store_true")
    di.add_argument("--seed", type=int, default=None)
    di.add_argument("--device", default=None)
    di.add_argument("--lam", type=float, default=None, help="weight lambda of the MIM term (a +mim method)")
    di.add_argument("--tau", type=float, default=None, help="temperature tau of the MIM term (a +mim method)")
    di.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                    help="any setting, e.g. --set mim.tau=0.2 --set method.lr_img=100 --set eval.epochs=300 "
                         "(tables: run, method, mim, eval; values in JSON, bare words are strings)")
    di.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_dist_args(di)
    di.set_defaults(func=_cmd_distill)

    ex = sub.add_parser("experts", help="train MTT expert trajectories (resumable, checksummed)")
    _add_data_args(ex)
    ex.add_argument("--num-experts", type=int, default=5)
    ex.add_argument("--epochs", type=int, default=22, help="max_start_epoch + expert_epochs is all MTT needs")
    ex.add_argument("--lr", type=float, default=0.01)
    ex.add_argument("--batch-size", type=int, default=256)
    ex.add_argument("--width", type=int, default=128)
    ex.add_argument("--depth", type=int, default=None)
    ex.add_argument("--no-dsa", action="store_true", help="train the experts without DSA")
    ex.add_argument("--experts-per-pass", type=int, default=None,
                    help="experts trained together as one grouped net (speed and memory only: the files are the "
                         "same; 1 = one by one; default: experts.EXPERTS_PER_PASS)")
    ex.add_argument("--out", required=True, help="directory for the expert files and manifest (under torchrun on "
                                                 "several nodes: one every node shares)")
    _add_dist_args(ex)
    ex.set_defaults(func=_cmd_experts)

    sh = sub.add_parser("show", help="summarise a run directory")
    sh.add_argument("run_dir")
    sh.set_defaults(func=_cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body() -> int:
        from .allocator import tune

        tune()  # big tensors reused from the heap, not page-faulted afresh (allocator.py)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return args.func(args)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
