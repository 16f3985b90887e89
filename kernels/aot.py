"""Compile the Triton kernels for a GPU architecture without a GPU (``python -m mim4dd_fast.kernels.aot``).

The interpreter runs kernels as Python, so it cannot catch what only the compiler rejects (operand
dtypes of ``tl.dot`` in a branch the interpreter never takes, loop-carried types, constexpr misuse)
nor show register spills. Compiling to a cubin needs only triton's bundled ptxas, so the tests do it
on CPU machines and print registers and local-memory (spill) bytes per kernel.
Must run with TRITON_INTERPRET unset or 0 (a fresh process): the kernels are decorated at import.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

from .backend import INTERPRET, triton
from .critics import CRITICS

__all__ = ["compile_contrastive", "compile_feature_reduce", "resource_usage"]


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def _signature(fn, types: dict, consts: dict) -> dict:
    return {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}


def _compile(fn, types, consts, arch, num_warps, num_stages):
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    if INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 was set before import: the kernels are interpreted, not compiled.")
    src = ASTSource(fn, _signature(fn, types, consts), consts)
    return triton_compile(src, target=_target(arch), options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_contrastive(kernel: str, critic: str, precision: str, d_pad: int, need_u: bool = True, *, arch: int = 90,
                        block_n: int = 64, block_m: int = 32, num_warps: int = 8, num_stages: int = 3):
    """Compile the forward ("forward") or the keys' gradient ("grad_b") kernel of one specialisation."""
    from . import contrastive_triton as ct

    crit, bf16 = CRITICS[critic], precision == "bf16"
    op, f32 = ("*bf16" if bf16 else "*fp32"), "*fp32"
    consts = dict(D_PAD=d_pad, PRECISION="ieee" if bf16 else precision, BF16=bf16, EMULATE=False,
                  BLOCK_N=block_n, BLOCK_M=block_m)
    types = dict(A=op, B=op, YA="*i64", YB="*i64", INV_NPOS=f32, W_NEG=f32, inv_tau="fp32", log_k="fp32")
    if kernel == "forward":
        fn = ct._forward_kernel
        types.update(LOSS=f32, STAT=f32, U=f32)
        consts.update(INIT=crit.tile_init, UPDATE=crit.tile_update, FINAL=crit.tile_final, NEED_U=need_u)
    else:
        fn = ct._grad_b_kernel
        types.update(STAT=f32, ROW_SCALE=f32, GB=f32)
        consts.update(GRAD=crit.tile_grad)
    return _compile(fn, types, consts, arch, num_warps, num_stages)


def compile_feature_reduce(kernel: str, p: int = 2, *, arch: int = 90):
    """Compile the pooling forward ("forward") or backward ("backward") kernel for float32 maps."""
    import importlib

    fr = importlib.import_module(".feature_reduce", __package__)  # the package re-exports the function's name
    if kernel == "forward":
        consts = dict(P=p, PP_PAD=triton.next_power_of_2(p * p), BLOCK_R=16, BLOCK_HW=256, ACC=triton.language.float32)
        return _compile(fr._pool_fwd_kernel, dict(x_ptr="*fp32", out_ptr="*fp32"), consts, arch, 4, 2)
    consts = dict(P=p, BLOCK_R=16, BLOCK_HW=256, ACC=triton.language.float32)
    return _compile(fr._pool_bwd_kernel, dict(g_ptr="*fp32", gx_ptr="*fp32"), consts, arch, 4, 2)


def resource_usage(compiled) -> dict:
    """Registers and local-memory bytes per thread (spills) of a compiled kernel, from cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return {"registers": int(match.group(1)), "local_bytes": int(match.group(2))} if match else {"raw": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--precisions", nargs="+", default=["ieee", "tf32x3", "tf32", "bf16"])
    p.add_argument("--critics", nargs="+", default=list(CRITICS))
    p.add_argument("--d-pad", type=int, nargs="+", default=[128])
    args = p.parse_args(argv)
    for critic in args.critics:
        for precision in args.precisions:
            for d_pad in args.d_pad:
                for kernel in ("forward", "grad_b"):
                    usage = resource_usage(compile_contrastive(kernel, critic, precision, d_pad, arch=args.arch))
                    print(json.dumps({"kernel": kernel, "critic": critic, "precision": precision, "d_pad": d_pad,
                                      **usage}), flush=True)
    for kernel in ("forward", "backward"):
        usage = resource_usage(compile_feature_reduce(kernel, arch=args.arch))
        print(json.dumps({"kernel": f"feature_reduce {kernel}", **usage}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
