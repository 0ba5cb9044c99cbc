"""Methods as recipe entries, recipe files, and the one table the CLI, the API and recipes share."""

from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

import qcompiler
from qcompiler.cli import RUN_FLAGS, build_parser, given_knobs, main
from qcompiler.config import CompileConfig, knobs, resolve
from qcompiler.errors import ConfigError
from qcompiler.methods import METHODS, RTN, Method, register
from qcompiler.recipe import dump_recipe, load_recipe


def initializers(path_or_bytes) -> dict[str, bytes]:
    m = onnx.load(path_or_bytes) if not isinstance(path_or_bytes, bytes) else onnx.load_from_string(path_or_bytes)
    return {i.name: numpy_helper.to_array(i).tobytes() for i in m.graph.initializer}


def test_every_cli_flag_is_a_recipe_key_and_every_key_a_flag():
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests - set(RUN_FLAGS) == set(knobs())
    assert not set(RUN_FLAGS) & set(knobs())


def test_cli_defaults_are_left_to_the_config():
    """Flags not given stay out, so a recipe's value is not overwritten by a flag's default."""
    args = build_parser().parse_args(["m.py", "-o", "m.onnx", "--iters", "7", "--per-tensor", "--no-reduce-range",
                                      "--override", "fc=w8a8"])
    assert given_knobs(args) == {"iters": 7, "per_channel": False, "reduce_range": False, "overrides": {"fc": "w8a8"}}


def test_a_method_is_one_recipe_entry(tiny):
    """A new method registered in the table alone compiles: rtn with percentile activation ranges."""
    register(Method("rtn-percentile", "round to nearest, percentile activation ranges", RTN, {"a_init": "percentile"}))
    try:
        r = qcompiler.compile(str(tiny), method="rtn-percentile")
    finally:
        del METHODS["rtn-percentile"]
    assert r.report["config"]["a_init"] == "percentile"
    same = qcompiler.compile(str(tiny), a_init="percentile")
    assert initializers(r.onnx_bytes) == initializers(same.onnx_bytes)
    assert initializers(r.onnx_bytes) != initializers(qcompiler.compile(str(tiny)).onnx_bytes)


def test_the_activation_range_exponent_moves_activation_steps_only(tiny):
    """``a_mse_p`` reaches the activation range search: with p = 2 (squared error) instead of 2.4 the
    activation scales change and the integer weights do not."""
    def split(r):
        m = onnx.load_from_string(r.onnx_bytes)
        arrays = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        weights = {k: a.tobytes() for k, a in arrays.items() if a.dtype.kind == "i" and a.ndim > 1}
        acts = {n.input[1] for n in m.graph.node if n.op_type == "QuantizeLinear"}
        return weights, {k: arrays[k].tobytes() for k in acts}
    default, squared = split(qcompiler.compile(str(tiny), bits="w4a4")), split(
        qcompiler.compile(str(tiny), bits="w4a4", a_mse_p=2.0))
    assert default[0] and default[0] == squared[0]
    assert default[1] != squared[1]


def test_resolution_order_defaults_method_recipe_options():
    cfg = resolve({"iters": 20}, {"method": "qdrop", "iters": 10, "bits": "w4a4", "qdrop": 0.25})
    assert (cfg.method, cfg.quant.bits, cfg.recon.iters, cfg.recon.qdrop) == ("qdrop", "w4a4", 20, 0.25)
    assert (cfg.recon.granularity, cfg.recon.act_quantizer) == ("block", "lsq")  # from the method's entry
    assert resolve({"method": "adaround"}).recon.granularity == "layer"


@pytest.mark.parametrize("given, needle", [
    ({"iter": 5}, "did you mean iters"),
    ({"iters": "5"}, "is not a int"),
    ({"bits": "w9a8"}, "outside 2..8"),
    ({"method": "nope"}, "unknown method"),
    ({"weight_quantizer": "nope", "method": "qdrop"}, "unknown quantizer family"),
    ({"a_mse_p": 0.5}, "a_mse_p"),
])
def test_bad_recipe_values_are_clear_errors(tiny, given, needle):
    with pytest.raises(ConfigError, match=needle):
        qcompiler.compile(str(tiny), recipe=given)


def test_a_recipe_survives_its_toml_form(tmp_path):
    cfg = resolve({"method": "qdrop", "bits": "w2a4", "w_lr": 0.05, "overrides": {"layer1.*": "w8a8"},
                   "w_symmetric": False, "percentile": 99.9})
    f = tmp_path / "r.toml"
    f.write_text(dump_recipe(cfg, "a header\nof two lines"))
    assert resolve(recipe=load_recipe(f)) == cfg
    f.write_text("bits = w4a4\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(f)


def test_a_run_repeats_from_its_reports_recipe(tiny, tmp_path, capsys):
    """--report writes recipe.toml; the run it gives has byte-identical initializers, and flags given
    beside --recipe win over it."""
    first, again, other = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    assert main([str(tiny), "-q", "--bits", "w4a4", "--method", "qdrop", "--iters", "20", "--w-lr", "0.05",
                 "--report", str(tmp_path / "rep"), "-o", str(first)]) == 0
    recipe = tmp_path / "rep" / "recipe.toml"
    text = recipe.read_text()
    assert 'method = "qdrop"' in text and "iters = 20" in text and "w_lr = 0.05" in text
    assert main([str(tiny), "-q", "--recipe", str(recipe), "-o", str(again)]) == 0
    assert initializers(again) == initializers(first)
    assert main([str(tiny), "-q", "--recipe", str(recipe), "--iters", "0", "-o", str(other)]) == 0
    assert initializers(other) != initializers(first)


def test_a_missing_recipe_is_one_line_and_exit_2(tiny, tmp_path, capsys):
    assert main([str(tiny), "-q", "--recipe", str(tmp_path / "none.toml"), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe" in err[0] and "does not exist" in err[0]


def test_fingerprint_leaves_out_what_cannot_change_the_model():
    fp = CompileConfig().fingerprint()
    assert {"cache_mb", "verify_samples", "min_agreement", "max_error"}.isdisjoint(fp)
    assert {"bits", "iters", "seed", "reduce_range", "method"} <= set(fp)
