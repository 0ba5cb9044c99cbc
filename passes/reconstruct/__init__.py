"""reconstruct: learn the quantizers unit by unit, each against the float model's output.

Rule, per unit in graph order (units come from ``partition``):

1. The quantizers of the recipe's families replace the calibrated ones: every weight quantizer
   becomes a ``recon.weight_quantizer`` (AdaRound: learned rounding), and, when some activations are
   quantized in the loop (``qdrop < 1``), every activation quantizer a ``recon.act_quantizer``
   (LSQ: learned steps). With ``qdrop = 1`` (BRECQ-style, float activations in the loop) the
   activations are calibrated again after reconstruction (the ``recalibrate`` pass).
2. Inputs: the float model's values at the unit's inputs (float stream) and the values the
   already-reconstructed prefix produces (quantized stream), cached for the whole calibration set
   (``cache.ActivationCache``: in memory up to ``cache_mb``, then memory-mapped files); the float
   outputs come from running the unit with its quantizers off.
3. Train (``trainer.train_unit``), with the unit hooks around it (``bias_correction`` when
   ``bias_correct``); a unit whose loss after training is above its loss before keeps the state it
   started from (its ``trained_loss`` is reported), so no unit ends worse than round-to-nearest with
   the calibrated steps. Then advance both streams by one forward of the unit. Each unit reports its
   loss before and after, with the soft rounding just before hardening and the fraction of
   roundings still undecided; a run that ends units with more than ``UNDECIDED_WARN`` undecided
   warns that its schedule was too short for the regulariser to decide them.

With ``holdout = N`` the last N calibration samples are left out of training and the hooks and only
measured: each unit reports its loss on them before and after. Each unit also reports the energy of
its float output on the rows its loss is measured on (``output_energy``: the loss of a zero output).
Whatever the units, the report gives the loss at every block's output (quantized stream against
float, first ``LOSS_ROWS`` rows) and that curve's oscillation (:func:`oscillation`), MRECG's
symptom, so granularities compare on the same points. Images are held channels-last (convolutions
keep that layout, elementwise ops follow it; oneDNN's depthwise convolutions run faster in it).
With a work directory a checkpoint is written after every unit and a rerun resumes after the last
finished one (``checkpoint``), reaching what an uninterrupted run reaches.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path

import torch

from qcompiler.errors import PreconditionError
from qcompiler.ir import registry
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Program, Unit
from qcompiler.passes.reconstruct import checkpoint
from qcompiler.passes.reconstruct.bias_correction import BiasCorrection, UnitHook
from qcompiler.passes.reconstruct.cache import ActivationCache, keep_freed_memory
from qcompiler.passes.reconstruct.trainer import duration, train_unit
from qcompiler.passes.reconstruct.units import (
    forward,
    needed_later,
    output_energy,
    quantizers_of,
    rec_loss,
    swap,
    unit_loss,
    unit_module,
)
from qcompiler.quantizers import family
from qcompiler.quantizers.family import Trainable

log = logging.getLogger("qcompiler.reconstruct")

UNDECIDED_WARN = 0.05  # warn when a unit ends with more of its roundings undecided than this
LOSS_ROWS = 256  # the block losses are measured on the first rows of the calibration set


def oscillation(losses: list[float]) -> float:
    """A loss curve's total upward variation: the sum over consecutive points of
    max(0, ln L_{i+1} - ln L_i). A curve that only rises scores ln(L_last / L_first); every
    dip-and-rise adds its rise again."""
    logs = [math.log(max(x, 1e-30)) for x in losses]
    return round(sum((max(0.0, b - a) for a, b in itertools.pairwise(logs)), 0.0), 4)


class Reconstruct(Pass):
    """Block/layer reconstruction of the recipe's quantizer families, with QDrop."""

    name = "reconstruct"

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)
        if program.units is None:
            raise PreconditionError("reconstruct needs units: run partition first")
        if not program.state.calibrated:
            raise PreconditionError("reconstruct needs calibrated quantizers: run calibrate first")

    def run(self, program: Program) -> PassResult:
        gm, recon = program.gm, program.config.recon
        w_family, a_family = family(recon.weight_quantizer), family(recon.act_quantizer)
        for n in list(program.quantizer_nodes("weight")):
            q = gm.get_submodule(str(n.target))
            if issubclass(w_family, Trainable) and not isinstance(q, w_family):
                w = registry.get_tensor(gm, str(n.args[0].target))
                swap(gm, str(n.target), w_family.from_quantizer(q, w.detach()))
        if recon.qdrop < 1.0 and issubclass(a_family, Trainable):
            for n in list(program.quantizer_nodes("act")):
                q = gm.get_submodule(str(n.target))
                if not isinstance(q, a_family):
                    swap(gm, str(n.target), a_family.from_quantizer(q))
        program.state.activations_learned = recon.qdrop < 1.0 and issubclass(a_family, Trainable)
        for prm in gm.parameters():
            prm.requires_grad_(False)
        cache = ActivationCache(recon.cache_mb << 20, program.work_dir)
        try:
            return self._run(program, cache)
        finally:
            cache.close()

    def _run(self, program: Program, cache: ActivationCache) -> PassResult:
        gm, recon, seed = program.gm, program.config.recon, program.config.quant.seed
        units: list[Unit] = program.units
        p = recon.qdrop
        data = []
        for k, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            x = torch.cat([b[k] if isinstance(b, tuple) else b[n.name] for b in program.calib])
            if x.dim() == 4 and x.is_floating_point():
                x = x.contiguous(memory_format=torch.channels_last)  # see the module's docstring
            data.append(x)
            cache.put("fp:" + n.name, x)
            cache.put("q:" + n.name, x)
        n_train = data[0].shape[0] - recon.holdout
        if n_train < 1:
            raise PreconditionError(f"holdout={recon.holdout} leaves none of the {data[0].shape[0]} calibration "
                                    "samples to reconstruct on")
        sig = checkpoint.signature(program.config.fingerprint(), [u.name for u in units], gm, data)
        del data
        ckpt_path = Path(program.work_dir) / checkpoint.CHECKPOINT if program.work_dir else None
        start, records = 0, []
        state = checkpoint.load(ckpt_path, sig)
        if state is not None:
            gm.load_state_dict(state["model"], strict=False)
            start, records = int(state["done"]), list(state.get("records", []))
            self._harden_done(program, start)
            log.info("resuming reconstruction after unit %d of %d from %s", start, len(units), ckpt_path)
        hooks: list[UnitHook] = [BiasCorrection()] if recon.bias_correct else []
        ends, block_loss = set(program.state.block_ends), {}
        needed = needed_later(units)
        keep_freed_memory()
        t_all = time.perf_counter()
        for i, unit in enumerate(units):
            extra = [x for x in needed[i] if x != unit.output]
            inner = [x for x in unit.nodes if x in ends and x != unit.output and x not in extra]
            sub = unit_module(gm, unit, extra + inner)
            fp_in = [cache["fp:" + x] for x in unit.inputs]
            q_in = [cache["q:" + x] for x in unit.inputs]
            with torch.no_grad():
                fp_out = forward(gm, sub, fp_in, quant=False)
            if i >= start:
                t0 = time.perf_counter()
                # the held-out rows (the last recon.holdout) are only measured
                tr_fp, tr_q, tr_out = [x[:n_train] for x in fp_in], [x[:n_train] for x in q_in], fp_out[0][:n_train]
                ho_q, ho_out = [x[n_train:] for x in q_in], fp_out[0][n_train:]
                before, ho_before = unit_loss(gm, sub, tr_q, tr_out), unit_loss(gm, sub, ho_q, ho_out, None)
                start_state = {k: v.detach().clone() for k, v in sub.state_dict().items()}
                for h in hooks:
                    h.before(gm, unit, tr_fp, tr_q)
                conv = train_unit(recon, seed, gm, sub, unit, i, tr_fp, tr_q, tr_out, p,
                                  estimate_for=len(units) - i if i == start else 0, loss_before=before)
                for h in hooks:
                    h.after(gm, unit, tr_fp, tr_q)
                after = unit_loss(gm, sub, tr_q, tr_out)
                if after > before:  # training made the unit worse: it keeps where it started
                    conv["trained_loss"] = after
                    after = self._restore(gm, sub, start_state, tr_q, tr_out)
                ho_after = unit_loss(gm, sub, ho_q, ho_out, None)
                energy = output_energy(tr_out)
                del tr_fp, tr_q, tr_out, ho_q, ho_out
                rec = {"unit": unit.name, "layers": len(unit.layers), "loss_before": before, "loss_after": after,
                       "output_energy": energy, **conv, "seconds": round(time.perf_counter() - t0, 2)}
                if recon.holdout:
                    rec.update(heldout_before=ho_before, heldout_after=ho_after)
                records.append(rec)
                self._log_unit(i, len(units), rec, records[-(i + 1 - start):], recon.holdout)
                if ckpt_path is not None:
                    checkpoint.save(ckpt_path, gm, i + 1, records, sig)
            with torch.no_grad():
                q_out = forward(gm, sub, q_in, quant=True)
            del fp_in, q_in
            for key in cache.keys():
                name = key.split(":", 1)[1]
                if not any(name in units[j].inputs for j in range(i + 1, len(units))):
                    cache.drop(key)
            outs = [unit.output, *extra, *inner]
            for name, f, q in zip(outs, fp_out, q_out, strict=True):
                if name in ends:
                    block_loss[name] = float(rec_loss(q[:LOSS_ROWS], f[:LOSS_ROWS]))
                if name not in inner:
                    cache.put("fp:" + name, f)
                    cache.put("q:" + name, q)
            del fp_out, q_out
        for n in program.quantizer_nodes("act"):
            gm.get_submodule(str(n.target)).scale.requires_grad_(False)
        self._warn_undecided(records, recon.iters)
        curve = [block_loss[x] for x in program.state.block_ends if x in block_loss]
        program.report["reconstruction"] = {"units": records, "seconds": round(time.perf_counter() - t_all, 2),
                                            "iters": recon.iters, "qdrop": p, "w_lr": recon.weight_lr(),
                                            "a_lr": recon.act_lr(), "bias_correct": recon.bias_correct,
                                            "granularity": program.state.granularity, "resumed_after": start,
                                            "block_losses": curve, "oscillation": oscillation(curve)}
        return PassResult(True, {"units": len(units), "resumed_after": start})

    @staticmethod
    def _restore(gm: torch.fx.GraphModule, sub: torch.fx.GraphModule, state: dict, q_in: list[torch.Tensor],
                 fp_out: torch.Tensor) -> float:
        """The unit's parameters and quantizers as they were before training, hardened again; its loss."""
        sub.load_state_dict(state)
        Reconstruct._harden(gm, sub)
        return unit_loss(gm, sub, q_in, fp_out)

    @staticmethod
    def _log_unit(i: int, total: int, rec: dict, done: list[dict], holdout: int) -> None:
        left = sum(r["seconds"] for r in done) / len(done) * (total - i - 1)
        held = f", held out {rec['heldout_before']:.4g} -> {rec['heldout_after']:.4g}" if holdout else ""
        soft = (f" (soft rounding {rec['loss_soft']:.4g}, {100 * rec['undecided']:.0f}% undecided)"
                if "loss_soft" in rec else "")
        eta = f", about {duration(left)} left" if i + 1 < total else ""
        if "trained_loss" in rec:
            soft += f"; training ended at {rec['trained_loss']:.4g}, worse than the start, which the unit keeps"
        log.info("%d/%d %-30s loss %.4g -> %.4g%s%s  (%.1fs%s)", i + 1, total, rec["unit"], rec["loss_before"],
                 rec["loss_after"], soft, held, rec["seconds"], eta)

    @staticmethod
    def _warn_undecided(records: list[dict], iters: int) -> None:
        open_units = [r for r in records if r.get("undecided", 0.0) > UNDECIDED_WARN]
        if open_units:
            worst = max(open_units, key=lambda r: r["undecided"])
            log.warning("%d of %d units ended training with more than %.0f%% of their roundings undecided (%s: %.0f%%, "
                        "loss %.4g with the soft rounding, %.4g hardened): the rounding did not converge in %d "
                        "iterations; more iterations (--iters) give the regulariser time to decide it", len(open_units),
                        len(records), 100 * UNDECIDED_WARN, worst["unit"], 100 * worst["undecided"],
                        worst["loss_soft"], worst["loss_after"], iters)

    @staticmethod
    def _harden_done(program: Program, done: int) -> None:
        """A resumed run's finished units: their learned quantizers in deployed form again."""
        for unit in program.units[:done]:
            Reconstruct._harden(program.gm, unit_module(program.gm, unit, []))

    @staticmethod
    def _harden(gm: torch.fx.GraphModule, sub: torch.fx.GraphModule) -> None:
        """Every learned quantizer of the unit ``sub`` in its deployed (hard) form."""
        for q in quantizers_of(gm, sub, "weight") + quantizers_of(gm, sub, "act"):
            if isinstance(q, Trainable):
                q.harden()
