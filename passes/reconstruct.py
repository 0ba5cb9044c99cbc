"""reconstruct: learn weight rounding (AdaRound) and activation steps (LSQ) unit by unit.

Rule, per unit in graph order (units come from ``partition``):

1. Inputs: the float model's values at the unit's inputs (FP stream) and the values the
   already-reconstructed prefix produces (quantized stream), both cached for the whole
   calibration set (``ActivationCache``: in memory up to ``cache_mb``, then memory-mapped files);
   the FP outputs come from running the unit with its quantizers off.
2. Train for ``iters`` steps on random mini-batches: QDrop mixes FP and quantized inputs
   element-wise (``where(u < p, fp, q)``) and, inside the unit, keeps each activation float with
   probability ``p``; loss = sum over channels of squared error vs the FP output, averaged, plus
   ``reg_weight`` * the AdaRound regulariser (beta annealed 20 -> 2 after a warm-up). AdaRound
   alphas use Adam at ``QConfig.adaround_lr()``; activation step sizes (when activations are
   quantized in the loop) use Adam at ``QConfig.lsq_lr()`` with cosine decay; unless set, both keep
   lr x iterations fixed beyond 2000 iterations. With ``p = 1`` the pipeline calibrates the
   activations again afterwards (``recalibrate``).
3. Harden the rounding, then advance both streams by one forward of the unit. Each unit reports
   its loss with the soft rounding just before hardening and the fraction of roundings still
   undecided (h between 0.1 and 0.9); a run that ends units with more than 5% undecided warns:
   its schedule was too short for the regulariser to decide them, and the hardened loss can be far
   above the soft one (EfficientNet-Lite0 W4A4 at 200 iterations: block 0 ends 51% undecided, loss
   64 soft, 445 hardened).

With ``bias_correct``, before and after step 2 each weighted layer of the unit, in graph order,
gets its bias shifted (``BiasQuantizer.shift``, quantized layer only) by the per-channel mean that
its quantized output (quantized stream in) is off from its float output (float stream in) over the
calibration set. Inputs after ReLU/ReLU6 have large means, so weight rounding errors that do not
sum to zero per channel shift whole channels: on EfficientNet-Lite0 this is most of the error of
the 4-bit depthwise weights. With ``holdout = N`` the last N calibration samples are left out of
step 2 and the correction and only measured: each unit reports its loss on them before and after.

Images are held channels-last (NHWC in memory; convolutions keep that layout, elementwise ops
follow it): on this CPU oneDNN's depthwise convolutions and their backwards run several times
faster in it, which about halves a step of EfficientNet-Lite0's large units; ResNet-20's
convolutions take the same time in either layout.

``p = 1`` is BRECQ-style (float activations in the loop), ``p = 0`` always quantized. Each unit's
RNG is seeded from (seed, unit index), and a checkpoint (all quantizer states + the number of
finished units) is written after every unit when ``config.work_dir`` is set: a rerun resumes after
the last finished unit and reaches the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from qcompiler.errors import PreconditionError
from qcompiler.ir import registry
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Program
from qcompiler.passes.partition import Unit, _is_param_side
from qcompiler.quantizers.adaround import AdaRoundQuantizer, BetaSchedule, rectified_sigmoid
from qcompiler.quantizers.bias import BiasQuantizer
from qcompiler.quantizers.lsq import LSQQuantizer
from qcompiler.quantizers.qdrop import MaskPool, in_layout_of, memory_order, qdrop_mix, take_rows

log = logging.getLogger("qcompiler.reconstruct")

CHECKPOINT = "reconstruct.ckpt"
UNDECIDED_WARN = 0.05  # warn when a unit ends with more of its roundings undecided than this


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    A training step allocates and frees dozens of activation-sized tensors. With glibc's defaults
    those come from fresh ``mmap`` pages or a heap top that is trimmed again after the step, so every
    step pays page faults on memory it already had. Raising the mmap and trim thresholds keeps the
    pages mapped; memory stays bounded by the largest step. Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


class ActivationCache:
    """The calibration set's values at unit boundaries, in memory up to a budget, then on disk.

    ``put`` keeps a tensor in memory while the total stays within ``budget_bytes``; beyond that the
    tensor is written to a memory-mapped file under ``directory`` (the work directory, or a temporary
    one) and the returned tensor reads from it, so the operating system's page cache, not the
    process, decides what stays resident. ``drop`` forgets a value (and deletes its file).
    """

    def __init__(self, budget_bytes: int, directory: str | None) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.values: dict[str, torch.Tensor] = {}
        self.files: dict[str, Path] = {}
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="qc_cache_")
        self.dir = Path(directory) / "cache" if directory else Path(self._tmp.name)

    def _shared(self, t: torch.Tensor, but: str | None = None) -> bool:
        """Whether another key holds this very tensor in memory (it is then counted once)."""
        return any(v is t for k, v in self.values.items() if k != but and k not in self.files)

    def put(self, key: str, t: torch.Tensor) -> torch.Tensor:
        self.drop(key)
        nbytes = t.numel() * t.element_size()
        if self._shared(t):
            self.values[key] = t
            return t
        if self.used + nbytes <= self.budget or t.dim() == 0:
            self.used += nbytes
            self.values[key] = t
            return t
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{len(self.files)}_{key.replace(':', '_')}.bin"
        flat = memory_order(t)  # kept in t's memory layout, so a spilled value computes as t would
        arr = np.memmap(path, dtype=flat.numpy().dtype, mode="w+", shape=(flat.numel(),))
        arr[...] = flat.numpy()
        arr.flush()
        self.files[key] = path
        self.values[key] = in_layout_of(torch.from_numpy(arr), t)
        return self.values[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.values[key]

    def keys(self) -> list[str]:
        return list(self.values)

    def drop(self, key: str) -> None:
        t = self.values.get(key)
        if t is None:
            return
        shared = self._shared(t, but=key)
        del self.values[key]
        path = self.files.pop(key, None)
        if path is None:
            if not shared:
                self.used -= t.numel() * t.element_size()
        else:
            del t
            path.unlink(missing_ok=True)

    def close(self) -> None:
        for key in list(self.values):
            self.drop(key)
        if self._tmp is not None:
            self._tmp.cleanup()


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


def _bias_quantizer(n: fx.Node, gm: fx.GraphModule) -> BiasQuantizer | None:
    """The quantizer of weighted layer ``n``'s bias, or None."""
    b = registry.args_of(n, gm).get("bias")
    if isinstance(b, fx.Node) and b.meta.get("qc.quantizer") == "bias":
        return gm.get_submodule(str(b.target))
    return None


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

        cache = ActivationCache(cfg.cache_mb << 20, cfg.work_dir)
        try:
            return self._run(program, cache)
        finally:
            cache.close()

    def _run(self, program: Program, cache: ActivationCache) -> PassResult:
        gm, cfg = program.gm, program.config
        units: list[Unit] = program.artifacts["units"]
        p = cfg.qdrop_prob()
        data = []
        for k, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            x = torch.cat([b[k] if isinstance(b, tuple) else b[n.name] for b in program.calib])
            if x.dim() == 4 and x.is_floating_point():
                x = x.contiguous(memory_format=torch.channels_last)  # see the module's docstring
            data.append(x)
            cache.put("fp:" + n.name, x)
            cache.put("q:" + n.name, x)
        # A checkpoint is only valid for the same configuration, units and calibration data.
        signature = {**self._signature(cfg), "units": [u.name for u in units],
                     "data": [[list(v.shape), float(v.double().sum())] for v in data]}
        n_train = data[0].shape[0] - cfg.holdout
        if n_train < 1:
            raise PreconditionError(f"holdout={cfg.holdout} leaves none of the {data[0].shape[0]} calibration samples "
                                    "to reconstruct on")
        del data
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
        keep_freed_memory()
        t_all = time.perf_counter()
        for i, unit in enumerate(units):
            extra = [x for x in needed[i] if x != unit.output]
            sub = unit_module(gm, unit, extra)
            fp_in = [cache["fp:" + x] for x in unit.inputs]
            q_in = [cache["q:" + x] for x in unit.inputs]
            with torch.no_grad():
                fp_out = self._forward(gm, sub, fp_in, quant=False)
            if i >= start:
                t0 = time.perf_counter()
                # the held-out rows (the last cfg.holdout) are only measured
                tr_fp, tr_q, tr_out = [x[:n_train] for x in fp_in], [x[:n_train] for x in q_in], fp_out[0][:n_train]
                ho_q, ho_out = [x[n_train:] for x in q_in], fp_out[0][n_train:]
                before, ho_before = self._loss(gm, sub, tr_q, tr_out), self._loss(gm, sub, ho_q, ho_out, None)
                if cfg.bias_correct:
                    f_means = self._correct_biases(gm, unit, tr_fp, tr_q)
                conv = self._train(cfg, gm, sub, unit, i, tr_fp, tr_q, tr_out, p,
                                   estimate_for=len(units) - i if i == start else 0)
                if cfg.bias_correct:
                    self._correct_biases(gm, unit, tr_fp, tr_q, f_means)
                after, ho_after = self._loss(gm, sub, tr_q, tr_out), self._loss(gm, sub, ho_q, ho_out, None)
                del tr_fp, tr_q, tr_out, ho_q, ho_out
                rec = {"unit": unit.name, "layers": len(unit.layers), "loss_before": before, "loss_after": after,
                       **conv, "seconds": round(time.perf_counter() - t0, 2)}
                if cfg.holdout:
                    rec.update(heldout_before=ho_before, heldout_after=ho_after)
                records.append(rec)
                done_s = [r["seconds"] for r in records[-(i + 1 - start):]]
                left = sum(done_s) / len(done_s) * (len(units) - i - 1)
                held = f", held out {ho_before:.4g} -> {ho_after:.4g}" if cfg.holdout else ""
                soft = (f" (soft rounding {conv['loss_soft']:.4g}, {100 * conv['undecided']:.0f}% undecided)"
                        if conv else "")
                log.info("%d/%d %-30s loss %.4g -> %.4g%s%s  (%.1fs%s)", i + 1, len(units), unit.name, before, after,
                         soft, held, rec["seconds"], f", about {_duration(left)} left" if i + 1 < len(units) else "")
                if ckpt_path is not None:
                    self._checkpoint(ckpt_path, gm, i + 1, records, signature)
            with torch.no_grad():
                q_out = self._forward(gm, sub, q_in, quant=True)
            del fp_in, q_in
            for key in cache.keys():
                name = key.split(":", 1)[1]
                if not any(name in units[j].inputs for j in range(i + 1, len(units))):
                    cache.drop(key)
            for name, f, q in zip([unit.output, *extra], fp_out, q_out, strict=True):
                cache.put("fp:" + name, f)
                cache.put("q:" + name, q)
            del fp_out, q_out
        for n in program.quantizer_nodes("act"):
            q = gm.get_submodule(str(n.target))
            q.scale.requires_grad_(False)
        open_units = [r for r in records if r.get("undecided", 0.0) > UNDECIDED_WARN]
        if open_units:
            worst = max(open_units, key=lambda r: r["undecided"])
            log.warning("%d of %d units ended training with more than %.0f%% of their roundings undecided (%s: %.0f%%, "
                        "loss %.4g with the soft rounding, %.4g hardened): the rounding did not converge in %d "
                        "iterations; more iterations (--iters) give the regulariser time to decide it", len(open_units),
                        len(records), 100 * UNDECIDED_WARN, worst["unit"], 100 * worst["undecided"],
                        worst["loss_soft"], worst["loss_after"], cfg.iters)
        program.report["reconstruction"] = {"units": records, "seconds": round(time.perf_counter() - t_all, 2),
                                            "iters": cfg.iters, "qdrop": p, "w_lr": cfg.adaround_lr(),
                                            "a_lr": cfg.lsq_lr(), "bias_correct": cfg.bias_correct,
                                            "granularity": program.artifacts.get("granularity")}
        return PassResult(True, {"units": len(units), "resumed_after": start})

    # -- helpers

    @staticmethod
    def _signature(cfg) -> dict:
        keys = ("method", "w_bits", "a_bits", "iters", "batch_size", "seed", "w_lr", "a_lr", "reg_weight", "qdrop",
                "granularity", "w_init", "a_init", "per_channel", "w_symmetric", "w_midrise", "w_step_lr",
                "bias_correct", "holdout", "a_bits_all", "overrides")
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
    @contextlib.contextmanager
    def _modes(gm: fx.GraphModule, sub: fx.GraphModule, mode: str) -> Iterator[None]:
        """Every quantizer of ``sub`` in ``mode`` inside the block, back to its own mode after."""
        saved = [(q, q.mode) for which in ("act", "weight") for q in _quantizers(gm, sub, which)]
        for q, _ in saved:
            q.mode = mode
        try:
            yield
        finally:
            for q, m in saved:
                q.mode = m

    def _forward(self, gm: fx.GraphModule, sub: fx.GraphModule, inputs: list[torch.Tensor], quant: bool,
                 chunk: int = 256) -> list[torch.Tensor]:
        with self._modes(gm, sub, "quant" if quant else "off"):
            outs = [sub(*[x[s:s + chunk] for x in inputs]) for s in range(0, inputs[0].shape[0], chunk)]
        return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]

    def _correct_biases(self, gm: fx.GraphModule, unit: Unit, fp_in, q_in,
                        f_means: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Empirical bias correction of the unit's weighted layers, in graph order.

        Each layer's bias quantizer absorbs (``BiasQuantizer.shift``) the per-channel mean by which
        the layer's output in the quantized unit (fed the quantized stream, the layers before it
        already corrected) differs from its output in the float unit (fed the float stream), over
        all the given rows. Returns the float means, to pass back when correcting again.
        """
        nodes = {n.name: n for n in gm.graph.nodes}
        layers = [x for x in unit.nodes if registry.kind(nodes[x], gm) in registry.WEIGHTED_KINDS
                  and _bias_quantizer(nodes[x], gm) is not None]
        if not layers:
            return []
        sub = unit_module(gm, unit, layers)
        axes = [1 if registry.kind(nodes[x], gm) == "conv" else -1 for x in layers]
        if f_means is None:
            f_means = self._channel_means(gm, sub, fp_in, False, axes)
        for k, name in enumerate(layers):
            bq = _bias_quantizer(nodes[name], gm)
            q_mean = self._channel_means(gm, sub, q_in, True, axes)[k]
            bq.shift -= (q_mean - f_means[k]).to(bq.shift.dtype)
        return f_means

    def _channel_means(self, gm, sub, inputs, quant: bool, axes: list[int], chunk: int = 256) -> list[torch.Tensor]:
        """Per-channel means (float64) of ``sub``'s extra outputs over all rows of ``inputs``; ``axes``
        gives each output's channel dimension."""
        sums: list[torch.Tensor] = [torch.zeros(())] * len(axes)
        counts = [0] * len(axes)
        with self._modes(gm, sub, "quant" if quant else "off"), torch.no_grad():
            for s in range(0, inputs[0].shape[0], chunk):
                outs = sub(*[x[s:s + chunk] for x in inputs])[1:]
                for k, (o, ax) in enumerate(zip(outs, axes, strict=True)):
                    ax %= o.dim()
                    sums[k] = sums[k] + o.double().sum(dim=[d for d in range(o.dim()) if d != ax])
                    counts[k] += o.numel() // o.shape[ax]
        return [t / c for t, c in zip(sums, counts, strict=True)]

    def _loss(self, gm, sub, q_in, fp_out, n: int | None = 256) -> float:
        """The quantized unit's loss on the first ``n`` rows (all with None; nan without rows)."""
        if fp_out.shape[0] == 0:
            return float("nan")
        with torch.no_grad():
            out = self._forward(gm, sub, [x[:n] for x in q_in], quant=True)[0]
            return float(_rec_loss(out, fp_out[:n]))

    def _train(self, cfg, gm, sub, unit: Unit, index: int, fp_in, q_in, fp_out, p: float,
               estimate_for: int = 0) -> dict[str, float]:
        """Learn the unit's rounding and steps. After a few iterations of the first unit trained in this
        run, log roughly how long ``estimate_for`` units of this size will take.

        Returns how far the rounding converged (empty without AdaRound weights): ``loss_soft``, the
        loss with the soft rounding just before hardening, and ``undecided``, the fraction of the
        unit's roundings whose ``h`` is still between 0.1 and 0.9 (hardening moves those weights by
        0.1 to 0.5 of a step each, which the soft loss did not see)."""
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + index)
        torch.manual_seed(cfg.seed * 100003 + index)
        wqs = [q for q in _quantizers(gm, sub, "weight") if isinstance(q, AdaRoundQuantizer)]
        aqs = [q for q in _quantizers(gm, sub, "act") if isinstance(q, LSQQuantizer)] if p < 1.0 else []
        for q in wqs:
            q.alpha.requires_grad_(True)
            q.soft = True
        # One optimizer, a parameter group per learning rate: alphas at a constant rate, step sizes
        # (activations; weights with ``w_step_lr``, relative to each quantizer's mean step) decayed
        # along a cosine to 0. One ``step`` call per iteration: its Python overhead is per call.
        groups, decays = [], []
        if wqs:
            groups.append({"params": [q.alpha for q in wqs], "lr": cfg.adaround_lr()})
            decays.append(False)
        if aqs:
            for q in aqs:
                q.scale.requires_grad_(True)
            groups.append({"params": [q.scale for q in aqs], "lr": cfg.lsq_lr()})
            decays.append(True)
        steps = list(wqs) if cfg.w_step_lr > 0 else []
        for q in steps:
            q.scale.requires_grad_(True)
            groups.append({"params": [q.scale], "lr": cfg.w_step_lr * float(q.scale.detach().abs().mean())})
            decays.append(True)
        opt = torch.optim.Adam(groups, fused=True) if groups else None
        sched = None
        if any(decays):
            def cosine(it: int) -> float:
                return 0.5 * (1.0 + math.cos(math.pi * min(it, cfg.iters) / cfg.iters))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, [cosine if d else (lambda it: 1.0) for d in decays])
        acts = _quantizers(gm, sub, "act")
        masks = MaskPool(p, gen) if 0.0 < p < 1.0 else None
        for q in acts:
            q.drop_prob = p
            q.drop_masks = masks
        beta_of = BetaSchedule(cfg.iters, warmup=0.2)
        n = fp_out.shape[0]
        probe = max(1, min(25, cfg.iters // 10))  # the estimate times iterations probe..2*probe
        bar = tqdm(range(cfg.iters), desc=unit.name, unit="it", leave=False,
                   disable=not log.isEnabledFor(logging.INFO) or cfg.iters < 50)
        # log lines print above the progress bar
        with self._modes(gm, sub, "quant"), logging_redirect_tqdm():
            try:
                for it in bar:
                    idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
                    xs = [qdrop_mix(take_rows(f, idx), take_rows(q, idx), p, masks) if f.is_floating_point()
                          else take_rows(q, idx) for f, q in zip(fp_in, q_in, strict=True)]
                    beta, reg_on = beta_of(it)
                    for q in wqs:  # the forward leaves each layer's regulariser in q.reg
                        q.reg_beta = beta if reg_on else None
                    out = sub(*xs)[0]
                    loss = _rec_loss(out, take_rows(fp_out, idx))
                    if reg_on and wqs:
                        loss = loss + cfg.reg_weight * sum(q.reg for q in wqs)
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if opt is not None:
                        opt.step()
                    if sched is not None:
                        sched.step()
                    for q in (*aqs, *steps):  # keep step sizes positive
                        q.scale.data.clamp_(min=1e-8)
                    if it % 100 == 0:
                        bar.set_postfix(loss=f"{loss.item():.4g}")
                    if estimate_for and it == probe:
                        t_probe = time.perf_counter()
                    if estimate_for and it == 2 * probe:
                        per_it = (time.perf_counter() - t_probe) / probe
                        log.info("reconstructing %d units x %d iterations: roughly %s (%.0f ms per iteration here)",
                                 estimate_for, cfg.iters, _duration(per_it * cfg.iters * estimate_for), 1e3 * per_it)
            finally:
                for q in acts:
                    q.drop_prob = 0.0
                    q.drop_masks = None
                for q in wqs:
                    q.reg_beta, q.reg = None, None
        conv = {}
        for q in wqs:
            q.alpha.requires_grad_(False)
        if wqs:
            with torch.no_grad():
                h = [rectified_sigmoid(q.alpha) for q in wqs]
                open_ = sum(int(((x > 0.1) & (x < 0.9)).sum()) for x in h)
            conv = {"loss_soft": self._loss(gm, sub, q_in, fp_out),
                    "undecided": round(open_ / sum(x.numel() for x in h), 4)}
        for q in wqs:
            q.harden()
        for q in (*aqs, *steps):
            q.scale.requires_grad_(False)
        return conv

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


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class _RecLoss(torch.autograd.Function):
    """Squared error summed over channels (dim 1), averaged over the rest, in two passes.

    Written with autograd's ops (sub, pow, sum, mean and their backwards) the loss made eight
    passes over an activation-sized tensor; here the forward is one difference and one dot product,
    the backward one scaled copy.
    """

    @staticmethod
    def forward(ctx, out, target):
        d = out - target
        n = out.numel() / out.shape[1] if out.dim() > 1 else out.numel()
        ctx.save_for_backward(d)
        ctx.n = n
        flat = memory_order(d)  # the order does not matter to a sum
        return torch.dot(flat, flat) / n

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        return d * (g * (2.0 / ctx.n)), None


def _rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over the rest (BRECQ's lp loss, p = 2)."""
    return _RecLoss.apply(out, target)
