"""MEKD's per-epoch diagnostics for metrics.jsonl (see methods/mekd.py).

GAN epochs: `gan_d_acc` (the discriminator's accuracy, %, on the real and fake images of the
epoch's updates, free), `gan_im_top` (the teacher's mean top probability on the IM queries the
epoch bought anyway, soft answers only) and, on a fixed latent batch of `diag_batch` images asked
at the end of the epoch (counted against the budget like any query, and with `edge_first` bought
only from budget the edge images cannot use): `gan_top_prob` (the teacher's
mean top probability, soft answers), `gan_classes` (classes the teacher's argmax covers) and
`gan_class_entropy` (entropy of that class histogram in nats; log K is every class equally often).
Distillation epochs: where the generator's inputs sit (`g_in_t_mean`, `g_in_t_rms` for the
teacher vectors, `g_in_s_*` for the student's; N(0, I) latents have mean 0 and rms 1) and the
transfer set's class histogram (`transfer_classes`, `transfer_class_entropy`, free: answers the run
already holds).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def class_stats(labels: torch.Tensor, num_classes: int) -> tuple[int, float]:
    """Classes present and the entropy (nats) of their histogram."""
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    p = counts[counts > 0] / counts.sum()
    return int((counts > 0).sum()), float(-(p * p.log()).sum())


def diagnostics(m: Any, epoch: int) -> dict[str, float]:
    """The epoch's diagnostics of an MEKD distiller `m` (its `stats` sums, a fixed-batch query)."""
    st, out = m.stats, {}
    if epoch < m.options.gan_epochs:
        if st.get("d_seen"):
            out["gan_d_acc"] = 100.0 * st["d_right"] / st["d_seen"]
        if st.get("im_seen") and m.kind == "soft":
            out["gan_im_top"] = st["im_top"] / st["im_seen"]
        n, spare = m.options.diag_batch, m.remaining
        edge_later = m.edge_t is None and m.options.edge_first and m.options.edge_share > 0
        if spare is not None and edge_later:
            spare -= len(m.edge)  # never displace an edge answer: edge images pay better
        unmatched = m.options.latents == "answers" and m.edge_t is None  # no answers to draw on
        if n > 0 and not unmatched and (spare is None or spare >= n):
            # the same latents every epoch (a private RNG)
            z = m.sample_latents(n, torch.Generator().manual_seed(m.seed + 2))
            was = m.generator.training
            m.generator.eval()  # the running statistics distillation will use; none updated
            device = next(m.generator.parameters()).device
            with torch.no_grad():
                answer = m.query(m.generate(z.to(device)))
            m.generator.train(was)
            t = m.answer_vector(answer)
            out["gan_classes"], out["gan_class_entropy"] = class_stats(t.argmax(1), m.num_classes)
            if m.kind == "soft":
                out["gan_top_prob"] = float(t.exp().max(1).values.mean())
        return out
    rows = st.get("g_in_rows", 0.0)
    if rows:
        for who in ("t", "s"):
            out[f"g_in_{who}_mean"] = st[f"g_in_{who}_mean"] / rows
            out[f"g_in_{who}_rms"] = math.sqrt(st[f"g_in_{who}_sq"] / rows)
    if m.pool_t is not None and len(m.pool_t):
        classes, entropy = class_stats(m.pool_t.argmax(1), m.num_classes)
        out["transfer_classes"], out["transfer_class_entropy"] = classes, entropy
        out["transfer_images"] = len(m.pool_t)  # generated images kept (min_confidence)
    return out
