"""The critics of the contrastive loss: the ONE place they are listed.

A critic is a module with the same three forms of its math (see ``critic_infonce.py``):

- ``reference(x, pos, neg, npos, nneg, log_k, neg_weight)``: per-anchor loss from the full [N, M]
  logits and float masks (used by ``reference.py``, the test oracle);
- ``positive_coef(inv_npos)``: coefficient c_i when l_i contains c_i * sum_{j in P_i} x_ij (the driver
  handles that part with per-class sums), or None;
- chunked PyTorch pieces over a [rows, M] logits chunk: ``chunk_forward(x, eq, inv_npos, w_neg, log_k,
  need_h) -> (row loss, saved statistic, row scale or None)`` (when need_h, x becomes dl/dx up to the
  row scale) and ``chunk_grad(x, eq, stat, inv_npos, w_neg, log_k)`` (x becomes dl/dx); ``eq()``
  gives the chunk's bool positive mask on demand;
- Triton tile functions: ``tile_init(BLOCK_N)``, ``tile_update(x, eq, valid, s1, s2, inv_npos, w_neg,
  log_k) -> (s1, s2, alpha, h)`` (online: previously accumulated h @ b is rescaled by alpha),
  ``tile_final(s1, s2, inv_npos, w_neg) -> (row loss, statistic, scale of the accumulated h @ b)`` and
  ``tile_grad(x, eq, stat, inv_npos, w_neg, log_k) -> dl/dx``.

Adding a critic = one such module + one entry below (the MIM term's settings read their choices
from this dict).
"""

from __future__ import annotations

from . import critic_infonce, critic_nce

CRITICS = {
    critic_infonce.NAME: critic_infonce,
    critic_nce.NAME: critic_nce,
}

__all__ = ["CRITICS"]
