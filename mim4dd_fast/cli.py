"""`mim4dd-fast` command line: distill | experts | evaluate | show.

Every user error (bad path, file, config, flag or hyperparameter) is printed as one sentence and the
process exits with code 2; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from .errors import UserError

console = Console(stderr=True)


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one sentence with exit code 2."""

    def error(self, message: str) -> None:  # noqa: D401
        console.print(f"error: {message}.")
        raise SystemExit(2)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="digits | cifar10 | cifar100 | mnist | fashion-mnist | imagefolder:PATH")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset files")
    p.add_argument("--image-size", type=int, default=None, help="resize square images to this size")
    p.add_argument("--zca", action="store_true", help="ZCA-whiten (fitted on the training split)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available.")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"Unknown device {name!r}; choose auto, cpu or cuda.")
    return name


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from .data import load_dataset
    from .evaluate import EvalConfig, random_baseline

    if not args.random:
        raise UserError("Give --random to evaluate the random-real baseline (saved runs: mim4dd-fast evaluate RUN_DIR).")
    if args.ipc < 1:
        raise UserError(f"--ipc must be at least 1, got {args.ipc}.")
    device = _device(args.device)
    dataset = load_dataset(args.dataset, args.data_dir, image_size=args.image_size, zca=args.zca, seed=args.seed)
    dataset.class_index.check_ipc(args.ipc)
    cfg = EvalConfig(epochs=args.epochs if args.epochs else EvalConfig.epochs, n_nets=args.nets)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"random real, IPC {args.ipc}", total=cfg.n_nets)
        result = random_baseline(dataset, args.ipc, cfg, seed=args.seed, device=device,
                                 progress=lambda i, acc: progress.advance(task))
    Console().print(
        f"random real subset, {args.dataset} IPC {args.ipc}: accuracy {100 * result['mean']:.2f}% "
        f"± {100 * result['std']:.2f}% over {cfg.n_nets} nets"
    )
    if args.json:
        from .io import atomic_write_json

        atomic_write_json(args.json, {"dataset": args.dataset, "ipc": args.ipc, "kind": "random", **result})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mim4dd-fast", description="Fast, measured dataset distillation (MIM4DD, MTT, DC, DM).")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    ev = sub.add_parser("evaluate", help="evaluate the random-real baseline or a saved run")
    ev.add_argument("run_dir", nargs="?", default=None, help="a distillation run directory to evaluate")
    _add_data_args(ev)
    ev.add_argument("--ipc", type=int, default=1)
    ev.add_argument("--random", action="store_true", help="evaluate a random real subset at this IPC")
    ev.add_argument("--nets", type=int, default=5, help="number of fresh evaluation nets")
    ev.add_argument("--epochs", type=int, default=None, help="training epochs per evaluation net")
    ev.add_argument("--json", default=None, help="write the result as JSON here")
    ev.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        console.print(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
