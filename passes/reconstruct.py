"""reconstruct: learn weight rounding (AdaRound) and activation steps (LSQ) unit by unit.

Rule, per unit in graph order (units come from ``partition``):

1. Inputs: the float model's values at the unit's inputs (FP stream) and the values the
   already-reconstructed prefix produces (quantized stream), both cached for the whole
   calibration set; the FP outputs come from running the unit with its quantizers off.
2. Train for ``iters`` steps on random mini-batches: QDrop mixes FP and quantized inputs
   element-wise (``where(u < p, fp, q)``) and, inside the unit, keeps each activation float with
   probability ``p``; loss = sum over channels of squared error vs the FP output, averaged, plus
   ``reg_weight`` * the AdaRound regulariser (beta annealed 20 -> 2 after a warm-up). AdaRound
   alphas use Adam at ``w_lr``; activation step sizes (when activations are quantized in the loop)
   use Adam at ``a_lr`` with cosine decay.
3. Harden the rounding, then advance both streams by one forward of the unit.

``p = 1`` is BRECQ-style (float activations in the loop), ``p = 0`` always quantized. Each unit's
RNG is seeded from (seed, unit index), and a checkpoint (all quantizer states + the number of
finished units) is written after every unit when ``config.work_dir`` is set: a rerun resumes after
the last finished unit and reaches the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from qcompiler.errors import PreconditionError
from qcompiler.ir import registry
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Program
from qcompiler.passes.partition import Unit, _is_param_side
from qcompiler.quantizers.adaround import AdaRoundQuantizer, BetaSchedule
from qcompiler.quantizers.lsq import LSQQuantizer
from qcompiler.quantizers.uniform import BiasQuantizer, MaskPool, qdrop_mix

log = logging.getLogger("qcompiler.reconstruct")

CHECKPOINT = "reconstruct.ckpt"


def unit_module(gm: fx.GraphModule, unit: Unit, extra_outputs: list[str]) -> fx.GraphModule:
    """A GraphModule computing ``unit`` from its inputs; it shares gm's modules and parameters."""
    nodes = {n.name: n for n in gm.graph.nodes}
    g = fx.Graph()
    env: dict[str, fx.Node] = {name: g.placeholder(name) for name in unit.inputs}

    def copy(n: fx.Node) -> fx.Node:
        if n.name not in env:
            for m in n.all_input_nodes:
                copy(m)
            env[n.name] = g.node_copy(n, lambda m: env[m.name])
        return env[n.name]

    for name in unit.nodes:
        n = nodes[name]
        for m in n.all_input_nodes:
            if _is_param_side(m):
                copy(m)
        copy(n)
    outs = [env[unit.output]] + [env[x] for x in extra_outputs]
    g.output(tuple(outs))
    return fx.GraphModule(gm, g)


def _quantizers(gm: fx.GraphModule, sub: fx.GraphModule, which: str) -> list[nn.Module]:
    """The ``which`` ("act"/"weight") quantizer modules a unit's graph calls."""
    return [gm.get_submodule(str(n.target)) for n in sub.graph.nodes if n.meta.get("qc.quantizer") == which]


def _swap(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    """Replace a quantizer submodule, re-pointing bias quantizers that reference the old one."""
    old = gm.get_submodule(target)
    gm.add_submodule(target, new)
    for m in gm.modules():
        if isinstance(m, BiasQuantizer):
            m.refs = tuple(new if r is old else r for r in m.refs)


class Reconstruct(Pass):
    """Block/layer reconstruction: AdaRound weights, LSQ activation steps, QDrop."""

    name = "reconstruct"

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)
        if "units" not in program.artifacts:
            raise PreconditionError("reconstruct needs units: run partition first")
        for n in program.quantizer_nodes("act"):
            if program.gm.get_submodule(str(n.target)).mode != "quant":
                raise PreconditionError("reconstruct needs calibrated quantizers: run calibrate first")

    def run(self, program: Program) -> PassResult:
        gm, cfg = program.gm, program.config
        units: list[Unit] = program.artifacts["units"]
        p = cfg.qdrop_prob()
        # Swap in the trainable quantizers.
        for n in list(program.quantizer_nodes("weight")):
            q = gm.get_submodule(str(n.target))
            if not isinstance(q, AdaRoundQuantizer):
                w = registry.get_tensor(gm, str(n.args[0].target))
                _swap(gm, str(n.target), AdaRoundQuantizer.from_quantizer(q, w.detach()))
        if p < 1.0:
            for n in list(program.quantizer_nodes("act")):
                q = gm.get_submodule(str(n.target))
                if not isinstance(q, LSQQuantizer):
                    _swap(gm, str(n.target), LSQQuantizer.from_quantizer(q))
        for prm in gm.parameters():
            prm.requires_grad_(False)

        fp_vals: dict[str, torch.Tensor] = {}
        q_vals: dict[str, torch.Tensor] = {}
        for k, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            fp_vals[n.name] = q_vals[n.name] = torch.cat(
                [b[k] if isinstance(b, tuple) else b[n.name] for b in program.calib])
        # A checkpoint is only valid for the same configuration, units and calibration data.
        signature = {**self._signature(cfg), "units": [u.name for u in units],
                     "data": [[list(v.shape), float(v.double().sum())] for v in fp_vals.values()]}
        ckpt_path = Path(cfg.work_dir) / CHECKPOINT if cfg.work_dir else None
        start, records = 0, []
        if ckpt_path is not None and ckpt_path.exists():
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            if state.get("signature") == signature:
                gm.load_state_dict(state["model"], strict=False)
                start, records = int(state["done"]), list(state.get("records", []))
                self._harden_done(gm, units, start)
                log.info("resuming reconstruction after unit %d of %d from %s", start, len(units), ckpt_path)
            else:
                log.info("ignoring %s: it was written for another configuration", ckpt_path)

        needed = self._needed_later(units)
        t_all = time.perf_counter()
        for i, unit in enumerate(units):
            extra = [x for x in needed[i] if x != unit.output]
            sub = unit_module(gm, unit, extra)
            fp_in = [fp_vals[x] for x in unit.inputs]
            q_in = [q_vals[x] for x in unit.inputs]
            with torch.no_grad():
                fp_out = self._forward(gm, sub, fp_in, quant=False)
            if i >= start:
                t0 = time.perf_counter()
                before = self._loss(gm, sub, q_in, fp_out[0])
                self._train(cfg, gm, sub, unit, i, fp_in, q_in, fp_out[0], p)
                after = self._loss(gm, sub, q_in, fp_out[0])
                rec = {"unit": unit.name, "layers": len(unit.layers), "loss_before": before, "loss_after": after,
                       "seconds": round(time.perf_counter() - t0, 2)}
                records.append(rec)
                log.info("%-34s loss %.4g -> %.4g  (%.1fs)", unit.name, before, after, rec["seconds"])
                if ckpt_path is not None:
                    self._checkpoint(ckpt_path, gm, i + 1, records, signature)
            with torch.no_grad():
                q_out = self._forward(gm, sub, q_in, quant=True)
            for name, f, q in zip([unit.output, *extra], fp_out, q_out, strict=True):
                fp_vals[name], q_vals[name] = f, q
            for name in list(fp_vals):
                if not any(name in units[j].inputs for j in range(i + 1, len(units))):
                    fp_vals.pop(name)
                    q_vals.pop(name)
        for n in program.quantizer_nodes("act"):
            q = gm.get_submodule(str(n.target))
            q.scale.requires_grad_(False)
        program.report["reconstruction"] = {"units": records, "seconds": round(time.perf_counter() - t_all, 2),
                                            "iters": cfg.iters, "qdrop": p,
                                            "granularity": program.artifacts.get("granularity")}
        return PassResult(True, {"units": len(units), "resumed_after": start})

    # -- helpers

    @staticmethod
    def _signature(cfg) -> dict:
        keys = ("method", "w_bits", "a_bits", "iters", "batch_size", "seed", "w_lr", "a_lr", "reg_weight", "qdrop",
                "granularity", "w_init", "a_init", "per_channel", "w_symmetric", "overrides")
        return {k: getattr(cfg, k) for k in keys}

    @staticmethod
    def _needed_later(units: list[Unit]) -> list[set[str]]:
        """For unit i, the names it produces that some later unit reads (its output always)."""
        produced = {x: i for i, u in enumerate(units) for x in u.nodes}
        out = [{u.output} for u in units]
        for u in units:
            for x in u.inputs:
                if x in produced:
                    out[produced[x]].add(x)
        return out

    @staticmethod
    def _set_modes(gm: fx.GraphModule, sub: fx.GraphModule, mode: str) -> list[tuple[nn.Module, str]]:
        saved = []
        for which in ("act", "weight"):
            for q in _quantizers(gm, sub, which):
                saved.append((q, q.mode))
                q.mode = mode
        return saved

    def _forward(self, gm: fx.GraphModule, sub: fx.GraphModule, inputs: list[torch.Tensor], quant: bool,
                 chunk: int = 256) -> list[torch.Tensor]:
        saved = self._set_modes(gm, sub, "quant" if quant else "off")
        try:
            outs = [sub(*[x[s:s + chunk] for x in inputs]) for s in range(0, inputs[0].shape[0], chunk)]
        finally:
            for q, m in saved:
                q.mode = m
        return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]

    def _loss(self, gm, sub, q_in, fp_out, n: int = 256) -> float:
        with torch.no_grad():
            out = self._forward(gm, sub, [x[:n] for x in q_in], quant=True)[0]
            return float(_rec_loss(out, fp_out[:n]))

    def _train(self, cfg, gm, sub, unit: Unit, index: int, fp_in, q_in, fp_out, p: float) -> None:
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + index)
        torch.manual_seed(cfg.seed * 100003 + index)
        wqs = [q for q in _quantizers(gm, sub, "weight") if isinstance(q, AdaRoundQuantizer)]
        aqs = [q for q in _quantizers(gm, sub, "act") if isinstance(q, LSQQuantizer)] if p < 1.0 else []
        for q in wqs:
            q.alpha.requires_grad_(True)
            q.soft = True
        opt_w = torch.optim.Adam([q.alpha for q in wqs], lr=cfg.w_lr) if wqs else None
        opt_a, sched_a = None, None
        if aqs:
            for q in aqs:
                q.scale.requires_grad_(True)
            opt_a = torch.optim.Adam([q.scale for q in aqs], lr=cfg.a_lr)
            sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=cfg.iters, eta_min=0.0)
        acts = _quantizers(gm, sub, "act")
        saved = self._set_modes(gm, sub, "quant")
        masks = MaskPool(p, gen) if 0.0 < p < 1.0 else None
        for q in acts:
            q.drop_prob = p
            q.drop_masks = masks
        beta_of = BetaSchedule(cfg.iters, warmup=0.2)
        n = fp_out.shape[0]
        bar = tqdm(range(cfg.iters), desc=unit.name, unit="it", leave=False,
                   disable=not log.isEnabledFor(logging.INFO) or cfg.iters < 50)
        try:
            for it in bar:
                idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
                xs = [qdrop_mix(f[idx], q[idx], p, masks) if f.is_floating_point() else q[idx]
                      for f, q in zip(fp_in, q_in, strict=True)]
                out = sub(*xs)[0]
                loss = _rec_loss(out, fp_out[idx])
                beta, reg_on = beta_of(it)
                if reg_on and wqs:
                    loss = loss + cfg.reg_weight * sum(q.regularizer(beta) for q in wqs)
                for opt in (opt_w, opt_a):
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in (opt_w, opt_a):
                    if opt is not None:
                        opt.step()
                if sched_a is not None:
                    sched_a.step()
                for q in aqs:  # keep step sizes positive
                    q.scale.data.clamp_(min=1e-8)
                if it % 100 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4g}")
        finally:
            for q in acts:
                q.drop_prob = 0.0
                q.drop_masks = None
            for q, m in saved:
                q.mode = m
        for q in wqs:
            q.alpha.requires_grad_(False)
            q.harden()
        for q in aqs:
            q.scale.requires_grad_(False)

    @staticmethod
    def _harden_done(gm: fx.GraphModule, units: list[Unit], done: int) -> None:
        for unit in units[:done]:
            sub = unit_module(gm, unit, [])
            for q in _quantizers(gm, sub, "weight"):
                if isinstance(q, AdaRoundQuantizer):
                    q.harden()

    @staticmethod
    def _checkpoint(path: Path, gm: fx.GraphModule, done: int, records: list, signature: dict) -> None:
        state = {"model": {k: v for k, v in gm.state_dict().items() if k.startswith("qc_")},
                 "done": done, "records": records, "signature": signature}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)


def _rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over the rest (BRECQ's lp loss, p = 2)."""
    d = (out - target).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()

