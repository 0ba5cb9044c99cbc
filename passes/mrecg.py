"""mrecg: reconstruct adjacent blocks together where their capacities differ most (MRECG).

Rule, for granularity ``mrecg-modcap`` or ``mrecg-loss`` (any other leaves the units as they are):
the units ``partition`` cut are blocks b_0..b_{n-1}, each with a metric m_i; the adjacent pairs
(b_i, b_{i+1}) are ranked by (m_i - m_{i+1})^2, largest first, and the first k are merged, k from
``ReconConfig.mrecg_pairs`` (``--mrecg-k``; by default one per six blocks).

- ``mrecg-modcap`` (data-free): m_i is the block's ModCap, the sum over its conv/linear layers of
  weight elements x weight bits x alpha, alpha = ``mrecg_alpha`` (1.6) for a layer with a stride
  above 1 and 1 otherwise (a float layer counts 32 bits). Pairwise only: a pair that shares a block
  with a pair chosen before it is passed over, so a merged unit is two blocks.
- ``mrecg-loss`` (data-dependent): m_i is the block's reconstruction loss after a probe, the same
  reconstruction on a copy of the program with ``probe_iters`` iterations per block on the first
  ``mrecg_probe_samples`` calibration samples; with ``mrecg_loss = relative`` that loss over the
  energy of the block's float output (the loss a zero output would have), so that a block does not
  rank high only because its outputs are large. Chosen pairs that share a block chain into one unit.

The metric per block, k, the merges and the units go to the log and to ``report["partition"]``.
A fixed list of merges (``Mrecg(merges=...)``) skips the ranking: the granularity study draws
random schemes that way.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

from torch import fx

from qcompiler.errors import PreconditionError
from qcompiler.ir import registry
from qcompiler.ir.passes import Pass, PassResult, require_graph
from qcompiler.ir.program import Program, Unit, batch_size, split_holdout
from qcompiler.passes.partition import describe, merge_units, set_units

log = logging.getLogger("qcompiler.mrecg")

MRECG = ("mrecg-modcap", "mrecg-loss")
FLOAT_BITS = 32


def modcap(gm: fx.GraphModule, unit: Unit, alpha: float) -> float:
    """The unit's ModCap: weight elements x weight bits x (alpha if stride > 1 else 1), summed over
    its conv and linear layers."""
    nodes = {n.name: n for n in gm.graph.nodes}
    total = 0.0
    for name in unit.nodes:
        n = nodes[name]
        if registry.kind(n, gm) not in registry.WEIGHTED_KINDS:
            continue
        args = registry.args_of(n, gm)
        w, bits = args["weight"], FLOAT_BITS
        if isinstance(w, fx.Node) and w.meta.get("qc.quantizer") == "weight":
            bits = w.meta["qc.qspec"].bits
            w = w.args[0]
        numel = registry.get_tensor(gm, str(w.target)).numel()
        stride = args.get("stride", 1)
        strided = max(stride) > 1 if isinstance(stride, (tuple, list)) else stride > 1
        total += numel * bits * (alpha if strided else 1.0)
    return total


def rank_pairs(metric: list[float], k: int, chain: bool) -> list[int]:
    """The left indices i of the k adjacent pairs (i, i+1) with the largest (m_i - m_{i+1})^2, in
    order; ties go to the earlier pair. Without ``chain`` a pair sharing a block with a pair
    chosen before it is passed over."""
    scores = [(metric[i] - metric[i + 1]) ** 2 for i in range(len(metric) - 1)]
    chosen: list[int] = []
    used: set[int] = set()
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if len(chosen) == k:
            break
        if not chain and (i in used or i + 1 in used):
            continue
        chosen.append(i)
        used |= {i, i + 1}
    return sorted(chosen)


def groups_of(pairs: list[int], n: int) -> list[list[int]]:
    """Runs of consecutive block indices 0..n-1, joined across each chosen pair (i, i+1)."""
    joined = set(pairs)
    groups = [[0]] if n else []
    for i in range(1, n):
        if i - 1 in joined:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class Mrecg(Pass):
    """Merge adjacent reconstruction blocks by MRECG's capacity metrics (module docstring)."""

    name = "mrecg"

    def __init__(self, merges: list[int] | None = None) -> None:
        """``merges``: left indices of the block pairs to merge (chains allowed), instead of ranking."""
        self.merges = merges

    def requires(self, program: Program) -> None:
        require_graph(program, self.name)
        if program.units is None:
            raise PreconditionError("mrecg needs units: run partition first")

    def run(self, program: Program) -> PassResult:
        granularity, recon = program.state.granularity, program.config.recon
        if self.merges is None and granularity not in MRECG:
            return PassResult(False, {})
        if granularity == "layer":
            raise PreconditionError("MRECG merges blocks: partition with a block or mrecg granularity")
        blocks, t0 = program.units, time.perf_counter()
        k = recon.mrecg_pairs(len(blocks))
        section = program.report.setdefault("partition", {})
        if self.merges is not None:
            metric, pairs = None, sorted(self.merges)
            if any(not 0 <= i < len(blocks) - 1 for i in pairs):
                raise PreconditionError(f"merges {pairs} name pairs outside 0..{len(blocks) - 2}")
        elif granularity == "mrecg-modcap":
            metric = [modcap(program.gm, u, recon.mrecg_alpha) for u in blocks]
            pairs = rank_pairs(metric, k, chain=False)
        else:
            metric, samples = probe_losses(program)
            pairs = rank_pairs(metric, k, chain=True)
            section["probe"] = {"iters": recon.probe_iters(), "samples": samples,
                                "seconds": round(time.perf_counter() - t0, 2)}
        units = merge_units(program.gm, blocks, groups_of(pairs, len(blocks)))
        set_units(program, units)
        merges = [[blocks[i].name, blocks[i + 1].name] for i in pairs]
        if metric is not None:
            log.info("%s metric per block: %s", granularity, " ".join(f"{m:.4g}" for m in metric))
        log.info("merged %d adjacent pair(s): %s", len(pairs), "; ".join(" + ".join(m) for m in merges) or "none")
        section.update(granularity=granularity if self.merges is None else "fixed merges", blocks=describe(blocks),
                       metric=metric, k=len(pairs) if self.merges is not None else k, merges=merges,
                       units=describe(units))
        return PassResult(True, {"blocks": len(blocks), "merges": len(pairs), "units": len(units)})


def probe_losses(program: Program) -> tuple[list[float], int]:
    """Each block's loss (absolute or relative) after the probe reconstruction (module docstring), run
    on copies (the program's graph and quantizers are left as they were), and the samples it ran on."""
    from qcompiler.passes.reconstruct import Reconstruct

    recon = program.config.recon
    calib = program.calib
    total = sum(batch_size(b) for b in calib)
    samples = min(recon.mrecg_probe_samples, total)
    if samples < total:
        calib, _ = split_holdout(calib, total - samples)
    config = dataclasses.replace(program.config, recon=dataclasses.replace(
        recon, iters=recon.probe_iters(), holdout=0, granularity="block"))
    probe = dataclasses.replace(program, gm=copy.deepcopy(program.gm), calib=calib, config=config, work_dir=None,
                                report={}, state=dataclasses.replace(program.state), units=list(program.units))
    log.info("mrecg-loss probe: %d iterations per block on %d samples (its per-block log follows)", config.recon.iters,
             samples)
    Reconstruct().run(probe)
    records = probe.report["reconstruction"]["units"]
    if recon.mrecg_loss == "relative":
        return [r["loss_after"] / max(r["output_energy"], 1e-30) for r in records], samples
    return [float(r["loss_after"]) for r in records], samples
