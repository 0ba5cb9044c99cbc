"""The training loop of one reconstruction unit.

Rule: for ``recon.iters`` steps, draw a random mini-batch of rows (its gradient accumulated over
micro-batches of at most ``recon.micro_batch`` rows, each weighted by its share); QDrop mixes the
float and the quantized stream element-wise (``where(u < p, fp, q)``) at the unit's inputs and,
inside the unit, keeps each activation float with probability ``p``; the loss is the squared error
summed over channels, averaged, against the float output, plus ``recon.reg_weight`` times the
quantizers' regularisers. The quantizers are learned through the family protocol
(``qcompiler.quantizers.family.Trainable``): one Adam optimizer with a parameter group per learning
rate, groups marked ``decay`` on a cosine to 0. Afterwards every trainable quantizer is hardened.
The unit's RNG is seeded from (seed, unit index), so a resumed run reaches what an uninterrupted one
does.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
from torch import fx
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from qcompiler.config import ReconConfig
from qcompiler.ir.program import Unit
from qcompiler.passes.reconstruct.qdrop import MaskPool, take_rows
from qcompiler.passes.reconstruct.units import modes, quantizers_of, rec_loss, unit_loss
from qcompiler.quantizers.family import ParamGroup, Trainable
from qcompiler.quantizers.qdrop import qdrop_mix

log = logging.getLogger("qcompiler.reconstruct")


def _optimizer(groups: list[ParamGroup], iters: int):  # noqa: ANN202
    """One Adam over the groups merged by key (one ``step`` call per iteration: its Python overhead
    is per call), and the cosine schedule of the decayed ones (None if none decays)."""
    merged: dict[str, ParamGroup] = {}
    for g in groups:
        if g.key in merged:
            merged[g.key].params.extend(g.params)
        else:
            merged[g.key] = ParamGroup(g.key, list(g.params), g.lr, g.decay)
    if not merged:
        return None, None
    opt = torch.optim.Adam([{"params": g.params, "lr": g.lr} for g in merged.values()], fused=True)
    if not any(g.decay for g in merged.values()):
        return opt, None

    def cosine(it: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(it, iters) / max(iters, 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [cosine if g.decay else (lambda it: 1.0)
                                                        for g in merged.values()])


def train_unit(recon: ReconConfig, seed: int, gm: fx.GraphModule, sub: fx.GraphModule, unit: Unit, index: int,
               fp_in: list[torch.Tensor], q_in: list[torch.Tensor], fp_out: torch.Tensor, p: float,
               estimate_for: int = 0, loss_before: float = float("nan")) -> dict[str, float]:
    """Learn the unit's quantizers (module docstring). After a few iterations of the first unit trained
    in this run, log roughly how long ``estimate_for`` units of this size will take.

    Returns how far a learned discrete choice converged (empty when no quantizer has one):
    ``loss_soft``, the loss just before hardening, and ``undecided``, the fraction of choices still
    open (for AdaRound, h between 0.1 and 0.9: hardening moves those weights by 0.1 to 0.5 of a step
    each, which the soft loss did not see); with ``recon.reg_relative``, also the unit's
    ``reg_weight``, ``reg_relative x loss_before / choices``."""
    gen = torch.Generator().manual_seed(seed * 100003 + index)
    torch.manual_seed(seed * 100003 + index)
    learners = [q for q in quantizers_of(gm, sub, "weight") if isinstance(q, Trainable)]
    if p < 1.0:  # activations are learned only where some of them are quantized in the loop
        learners += [q for q in quantizers_of(gm, sub, "act") if isinstance(q, Trainable)]
    opt, sched = _optimizer([g for q in learners for g in q.begin_training(recon)], recon.iters)
    reg_weight = _reg_weight(recon, learners, loss_before)
    acts = quantizers_of(gm, sub, "act")
    masks = MaskPool(p, gen) if 0.0 < p < 1.0 else None
    for q in acts:
        q.drop_prob = p
        q.drop_masks = masks
    # Inputs both streams agree on (nothing quantized upstream: masks, positions) are not mixed:
    # mixing would gain nothing and turn their infinities into NaN.
    fp_in = [None if torch.equal(f, q) else f for f, q in zip(fp_in, q_in, strict=True)]
    n = fp_out.shape[0]
    probe = max(1, min(25, recon.iters // 10))  # the estimate times iterations probe..2*probe
    # the bar only on a terminal (tqdm's disable=None): into a file it is a line per refresh
    bar = tqdm(range(recon.iters), desc=unit.name, unit="it", leave=False,
               disable=None if log.isEnabledFor(logging.INFO) and recon.iters >= 50 else True)
    # log lines print above the progress bar, from the root's handlers and from this logger's own
    with modes(gm, sub, "quant"), logging_redirect_tqdm([logging.getLogger(), log]):
        try:
            for it in bar:
                idx = torch.randint(0, n, (min(recon.batch_size, n),), generator=gen)
                for q in learners:
                    q.before_step(it)
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                shown = backward_batch(sub, fp_in, q_in, fp_out, idx, recon.micro_batch, p, masks,
                                       lambda: _regularizer(learners, reg_weight))
                if opt is not None:
                    opt.step()
                if sched is not None:
                    sched.step()
                for q in learners:
                    q.after_step()
                if it % 100 == 0:
                    bar.set_postfix(loss=f"{float(shown):.4g}")
                if estimate_for and it == probe:
                    t_probe = time.perf_counter()
                if estimate_for and it == 2 * probe:
                    per_it = (time.perf_counter() - t_probe) / probe
                    log.info("reconstructing %d units x %d iterations: roughly %s (%.0f ms per iteration here)",
                             estimate_for, recon.iters, duration(per_it * recon.iters * estimate_for), 1e3 * per_it)
        finally:
            for q in acts:
                q.drop_prob = 0.0
                q.drop_masks = None
    conv = {}
    choices = [c for c in (q.convergence() for q in learners) if c is not None]
    if choices:
        conv = {"loss_soft": unit_loss(gm, sub, q_in, fp_out),
                "undecided": round(sum(c[0] for c in choices) / sum(c[1] for c in choices), 4)}
        if recon.reg_relative > 0:
            conv["reg_weight"] = reg_weight
    for q in learners:
        q.harden()
    return conv


def backward_batch(sub: fx.GraphModule, fp_in: list[torch.Tensor | None], q_in: list[torch.Tensor],
                   fp_out: torch.Tensor, idx: torch.Tensor, micro_batch: int, p: float, masks: MaskPool | None,
                   reg: Callable[[], torch.Tensor | None]) -> torch.Tensor:
    """Backpropagate the mean loss over rows ``idx`` plus ``reg()``, ``micro_batch`` rows at a time
    (each micro-batch's loss weighted by its share of the rows); returns the loss, detached. An
    input whose float stream is None is read from the quantized stream alone. ``reg`` is called
    after the last micro-batch's forward (a quantizer may compute its regulariser in its forward)."""
    parts = idx.split(micro_batch)
    total = torch.zeros(())
    for j, part in enumerate(parts):
        xs = [take_rows(q, part) if f is None or not f.is_floating_point()
              else qdrop_mix(take_rows(f, part), take_rows(q, part), p, masks)
              for f, q in zip(fp_in, q_in, strict=True)]
        loss = rec_loss(sub(*xs)[0], take_rows(fp_out, part))
        if len(parts) > 1:
            loss = loss * (len(part) / len(idx))
        r = reg() if j == len(parts) - 1 else None
        if r is not None:
            loss = loss + r
        loss.backward()
        total += loss.detach()
    return total


def _reg_weight(recon: ReconConfig, learners: list[Trainable], loss_before: float) -> float:
    """The regulariser's weight for one unit: ``recon.reg_weight``; with ``recon.reg_relative = R``,
    R x the unit's loss before training / its number of discrete choices, so the regulariser at its
    largest (every choice open) is R times the loss it starts from, whatever the unit's size and the
    scale of its output (a fixed weight counts choices against a loss that follows the output's scale)."""
    choices = sum(c[1] for c in (q.convergence() for q in learners) if c is not None)
    if recon.reg_relative <= 0 or not choices or not math.isfinite(loss_before):
        return recon.reg_weight
    return recon.reg_relative * loss_before / choices


def _regularizer(learners: list[Trainable], weight: float) -> torch.Tensor | None:
    regs = [r for r in (q.regularizer() for q in learners) if r is not None]
    return weight * sum(regs) if regs else None


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
