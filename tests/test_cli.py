"""Every command-line flag has help text, and --help shows what each default is."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from export.cli import parser as export_parser
from models.evaluate import parser as eval_parser
from models.profile import parser as profile_parser
from models.train import TrainConfig, parse_args
from models.warn import Architecture, WARNConfig
from service.client import parser as predict_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("make", [export_parser, eval_parser, profile_parser, predict_parser])
def test_argparse_flags_have_help_and_defaults(make):
    p = make()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help text"
        if action.option_strings and action.default not in (None, False):
            assert "default" in action.help, f"{action.option_strings[0]} does not show its default"
    assert "(default:" in p.format_help()


def test_warn_train_is_derived_from_its_config(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    # every option is declared once: the training fields, and the architecture's (no prefix on the flags)
    options = [f for f in dataclasses.fields(TrainConfig) if f.name != "arch"] + list(dataclasses.fields(Architecture))
    for field in options:
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, f"{flag} is missing from warn-train --help"
    assert text.count("(default:") == len(options)
    assert {f.name for f in dataclasses.fields(Architecture)} <= {f.name for f in dataclasses.fields(WARNConfig)}
    cfg = parse_args(["--ad", "2", "--aw", "3", "--momentum", "0.8", "--warmup-epochs", "0.5", "--download"])
    assert (cfg.arch.attention_depth, cfg.arch.attention_width, cfg.momentum, cfg.warmup_epochs) == (2, 3, 0.8, 0.5)
    assert cfg.download and parse_args([]) == TrainConfig()


def test_train_and_eval_say_what_is_wrong_with_the_data_without_a_traceback(tmp_path):
    from models.evaluate import main as evaluate
    from models.train import main as train

    layout = "(ImageFolder layout: <root>/train/<class>/*.jpg and <root>/val/...)"
    with pytest.raises(SystemExit) as stop:
        train(["--dataset", "imagefolder", "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    assert stop.value.code == f"warn-train: imagefolder expects {tmp_path / 'train'} {layout}"
    with pytest.raises(SystemExit) as stop:
        evaluate([str(ROOT / "default_model/model.pt"), "--dataset", "imagefolder", "--data-root", str(tmp_path)])
    assert stop.value.code == f"warn-eval: imagefolder expects {tmp_path / 'val'} {layout}"
