"""The config documents and checks itself: Literal choices, ranges, docs, and the CLI defaults.

Fast: no model is loaded.
"""

import dataclasses
import tomllib
import typing

import pytest

from ladd import config as C
from ladd.config import Config, ConfigError, LogConfig, ModelConfig, load_config, to_dict

SECTIONS = C._section_types()


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_literals_match_the_losses_module():
    from ladd import losses

    assert typing.get_args(C.Loss) == losses.KINDS
    assert typing.get_args(C.Aggregate) == losses.AGGREGATES


@pytest.mark.parametrize("how", ["set", "toml"])
def test_a_choice_outside_its_literal_is_one_line_naming_key_and_choices(tmp_path, how):
    def load(section, key, value):
        if how == "set":
            return load_config(None, [f"{section}.{key}={value}"])
        (tmp_path / "c.toml").write_text(f"[{section}]\n{key} = {value}\n")
        return load_config(tmp_path / "c.toml")

    with pytest.raises(ConfigError) as e:
        load("model", "student", '"x"')
    assert _one_line(e) == "model.student 'x' is unknown; choose 'full' or 'lora'"
    with pytest.raises(ConfigError) as e:
        load("health", "on_collapse", '"rolback"')
    assert _one_line(e) == ("health.on_collapse 'rolback' is unknown; choose 'warn', 'stop' or 'rollback' "
                            "(did you mean 'rollback'?)")
    with pytest.raises(ConfigError, match=r"log.trackers 'tensorbord' is unknown; choose 'tensorboard' or 'wandb' "
                                          r"\(did you mean 'tensorboard'\?\)"):
        load("log", "trackers", '["tensorbord"]')
    with pytest.raises(ConfigError, match="method.loss 3 is unknown; choose 'hinge' or 'nonsaturating'"):
        load("method", "loss", "3")


def test_every_literal_field_refuses_a_bad_value_built_in_python():
    """The check is in the sections' shared __post_init__, not the loader: Python defaults are held to it."""
    literal_fields = []
    needs = {"method.paired_target": {"distill_weight": 1.0}}  # a choice that is valid only with another setting
    for name, cls in SECTIONS.items():
        for key, hint in C._hints(cls).items():
            choices = C.literal_choices(hint)
            if not choices:
                continue
            literal_fields.append(f"{name}.{key}")
            good = [choices[-1]] if typing.get_origin(hint) is list else choices[-1]
            cls(**{key: good}, **needs.get(f"{name}.{key}", {}))  # every choice is accepted
            bad = ["nope"] if typing.get_origin(hint) is list else "nope"
            with pytest.raises(ConfigError, match=rf"^{name}\.{key} 'nope' is unknown; choose "):
                cls(**{key: bad})
    assert {"model.student", "model.text_cond", "method.loss", "method.aggregate", "optim.optimizer",
            "optim.decay", "train.mixed_precision", "health.on_collapse", "log.trackers"} <= set(literal_fields)
    with pytest.raises(ConfigError, match="model.student 'x' is unknown"):
        ModelConfig(student="x")
    with pytest.raises(ConfigError, match="log.trackers 'x' is unknown"):
        Config(log=LogConfig(trackers=["x"]))


@pytest.mark.parametrize("setting, message", [
    ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1, got 0"),
    ("log.every=0", "log.every must be >= 1, got 0"),
    ("validation.every=-1", "validation.every must be >= 0 (0: only step 0 and the end), got -1"),
    ("validation.num_prompts=0", "validation.num_prompts must be >= 1, got 0"),
    ("train.steps=-1", "train.steps must be >= 0, got -1"),
    ("health.nan_patience=0", "health.nan_patience must be >= 1, got 0"),
    ("health.collapse_window=0", "health.collapse_window must be >= 1, got 0"),
    ("data.batch_per_rank=0", "data.batch_per_rank must be >= 1, got 0"),
    ("model.lora_rank=0", "model.lora_rank must be >= 1, got 0"),
    ("model.disc_cond_dim=0", "model.disc_cond_dim must be >= 1, got 0"),
    ("optim.betas_d=[0.9, 1.5]", "optim.betas_d must be two numbers in [0, 1), got [0.9, 1.5]"),
])
def test_out_of_range_intervals_are_refused_with_one_line(setting, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [setting])
    assert _one_line(e) == message


def test_zero_means_what_it_says():
    cfg = load_config(None, ["validation.every=0", "train.steps=0"])  # validation at step 0 and the end only
    assert (cfg.validation.every, cfg.train.steps) == (0, 0)


def test_every_field_has_a_one_line_doc():
    """Fails when a field is added without the string literal below it (or a section without a docstring)."""
    for name, cls in SECTIONS.items():
        docs = C.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{name}.{f.name} has no doc: add a string on the line below it"
            assert "\n" not in docs[f.name], f"{name}.{f.name}: the doc is one line"
        assert cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("), f"[{name}] has no docstring"


def test_config_show_doc_prints_every_field_and_parses_back(capsys):
    from ladd.cli import main

    assert main(["config", "show", "--doc"]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out) == to_dict(load_config(None))
    lines = out.splitlines()
    for name, cls in SECTIONS.items():
        docs = C.field_docs(cls)
        for f in dataclasses.fields(cls):
            at = next(i for i, line in enumerate(lines) if line.startswith(f"{f.name} = ")
                      and lines.index(f"[{name}]") < i)
            assert lines[at - 1] == f"# {docs[f.name]}  [{C.type_name(C._hints(cls)[f.name])}]"
    assert '# the adversarial loss ("nonsaturating" = the logistic GAN loss)  ["hinge" | "nonsaturating"]' in lines
    assert main(["config", "show"]) == 0
    plain = capsys.readouterr().out
    assert "#" not in plain and tomllib.loads(plain) == to_dict(load_config(None))


def test_eval_cli_defaults_are_the_eval_config_defaults(monkeypatch):
    from ladd.cli import build_parser, main
    from ladd.eval import commands

    args = build_parser().parse_args(["eval", "--data", "x"])
    expected = commands.EvalConfig(data="x")
    for f in dataclasses.fields(commands.EvalConfig):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            assert (tuple(value) if f.name == "seeds" else value) == getattr(expected, f.name), f.name
    seen = []
    monkeypatch.setattr(commands, "evaluate", seen.append)
    assert main(["eval", "--data", "x"]) == 0
    assert seen == [expected]
    assert main(["eval", "--data", "x", "--no-fid", "--seeds", "1", "2"]) == 0
    assert (seen[-1].fid, seen[-1].seeds) == (False, (1, 2))


def test_demo_quick_keeps_what_is_given():
    from ladd.demo import DemoConfig

    assert DemoConfig(quick=True, seeds=3).seeds == 3
    assert DemoConfig(quick=True).seeds == 1 and DemoConfig().seeds == 5
    quick = DemoConfig(quick=True, n_train=64, n_eval=32)
    assert (quick.n_train, quick.n_eval) == (64, 32)
    assert (DemoConfig(quick=True).n_train, DemoConfig().n_eval) == (128, 192)
    with pytest.raises(ValueError, match="--seeds"):
        DemoConfig(seeds=0)
