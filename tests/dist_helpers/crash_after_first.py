"""Under torchrun: every rank trains experts collectively, then dies (exit 3) right after its first one.

    torchrun --nproc-per-node 2 tests/dist_helpers/crash_after_first.py OUT_DIR NUM_EXPERTS EPOCHS WIDTH

The ranks meet at a barrier after their first expert is on disk (file + pending record), so the state
left behind is deterministic: experts 0 .. world_size - 1 written, no manifest. Used to test resume.
"""

import os
import sys

from mim4dd_fast.data import load_dataset
from mim4dd_fast.distributed import init_from_env
from mim4dd_fast.experts import train_experts
from mim4dd_fast.models import default_depth

out, num, epochs, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dist = init_from_env(60.0, "cpu")
dataset = load_dataset("digits", None, image_size=None, zca=False, seed=0)


def crash(k: int, done: int, total: int) -> None:
    if done == total:
        dist.barrier("crash helper")
        os._exit(3)


train_experts(dataset, out, num_experts=num, epochs=epochs, seed=0,
              model_kwargs={"width": width, "depth": default_depth(dataset.image_size)}, progress=crash, dist=dist)
raise SystemExit("unreachable: every rank owns at least one expert")
