"""bench.overhead, the cost of attention on other shapes (README, "Pool-first attention"); bench.ops' arguments."""

import argparse

import pytest

from bench import overhead


def test_the_default_shape_costs_what_the_readme_says():
    r = overhead.measure(10, 2, 3, threads=1, seconds=0.2, rounds=1)
    assert r["arch"] == "WRN-10-2, AD=3" and round(r["flops_overhead"], 3) == 0.097
    assert r["warn_img_s"] > 0 and r["backbone_img_s"] > 0


@pytest.mark.parametrize("text", ["16-2", "12-2:3", "16-0:3", "16-2:4", "a-b:c"])
def test_a_shape_that_is_no_wide_resnet_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        overhead.arch(text)
    assert overhead.arch("16-2:3") == (16, 2, 3)


@pytest.mark.parametrize("args", [["--runs", "0"], ["--batch", "-1"], ["--seconds", "0"], ["--threads", "-2"]])
def test_bench_ops_refuses_counts_it_cannot_run(args, capsys):
    from bench import ops

    with pytest.raises(SystemExit) as e:
        ops.main(args)
    assert e.value.code == 2 and "--seconds positive" in capsys.readouterr().err


def test_bench_ops_refuses_a_baseline_that_is_not_there(tmp_path, capsys):
    from bench import ops

    with pytest.raises(SystemExit) as e:
        ops.main(["--baseline", str(tmp_path / "before.onnx")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err


def test_bench_ops_refuses_a_baseline_it_cannot_run(tmp_path, capsys):
    """Before the exports: a file that is no ONNX, and a model for other images."""
    from bench import ops
    from export.onnx_export import _export
    from models.warn import warn

    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    _export(warn(depth=10, width=1, input_size=(24, 24)).eval(), tmp_path / "small.onnx")
    for name, says in (("junk.onnx", "cannot load"), ("small.onnx", "of 48x48 images")):
        with pytest.raises(SystemExit) as e:
            ops.main(["--baseline", str(tmp_path / name)])
        assert e.value.code == 2 and says in capsys.readouterr().err
