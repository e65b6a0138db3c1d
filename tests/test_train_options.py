"""``TrainOptions``: one field per hyperparameter, its default and its check; ``train`` reads it or keywords."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bora_tools.errors import ValidationError
from bora_tools.training.options import SCHEDULERS, TrainOptions
from bora_tools.training.sft import train

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_defaults_pass_their_checks_and_the_options_are_frozen():
    options = TrainOptions()
    assert options.problems() == []
    assert (options.r, options.blocks, options.lr, options.scheduler, options.dtype) == (8, 4, 2e-4, "linear", "auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.r = 16


@pytest.mark.parametrize("field,value,want", [
    ("r", 0, "an integer >= 1"),
    ("r", 2.0, "an integer >= 1"),
    ("r", True, "an integer >= 1"),
    ("blocks", -1, "an integer >= 1"),
    ("alpha", math.nan, "a finite number"),
    ("alpha", "16", "a finite number"),
    ("dropout", 1.0, "a number in [0, 1)"),
    ("dropout", -0.1, "a number in [0, 1)"),
    ("epochs", 0, "a number > 0"),
    ("max_steps", 0, "an integer >= 1"),
    ("lr", math.inf, "a number > 0"),
    ("scheduler", "cosine_with_restarts", "one of linear, cosine, constant"),
    ("warmup_steps", -1, "an integer >= 0"),
    ("batch_size", 0, "an integer >= 1"),
    ("grad_accum", 0, "an integer >= 1"),
    ("max_length", 1, "an integer >= 2"),
    ("save_steps", 0, "an integer >= 1"),
    ("logging_steps", 1.5, "an integer >= 1"),
    ("seed", 1.5, "an integer in [0, 2**32)"),
    ("seed", -1, "an integer in [0, 2**32)"),
])
def test_each_bad_value_is_one_problem_naming_the_field(field, value, want):
    problems = TrainOptions(**{field: value}).problems()
    assert problems == [f"`{field}`: expected {want}, found {value!r}"]


def test_none_passes_only_where_it_is_the_default():
    assert TrainOptions(alpha=None, max_steps=None, save_steps=None, logging_steps=None).problems() == []
    assert TrainOptions(r=None).problems() == ["`r`: expected an integer >= 1, found None"]


def test_problems_come_in_field_order():
    problems = TrainOptions(seed="x", r=0, lr=0).problems()
    assert [p.split("`")[1] for p in problems] == ["r", "lr", "seed"]


def test_from_dict_reads_field_names_over_a_base():
    base = TrainOptions(r=16, epochs=2.0)
    assert TrainOptions.from_dict({"lr": 1e-3}, base=base) == TrainOptions(r=16, epochs=2.0, lr=1e-3)
    assert TrainOptions.from_dict({}) == TrainOptions()


def test_from_dict_refuses_unknown_keys_by_name():
    with pytest.raises(ValidationError, match=r"^train: 2 problems: `warmup_step`: not a training option \(did you "
                                              r"mean `warmup_steps`\?\); `learning_rate`: not a training option$"):
        TrainOptions.from_dict({"warmup_step": 10, "learning_rate": 1e-4, "r": 4})


def test_train_refuses_an_unknown_keyword_before_anything_else(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValidationError, match=r"`rank`: not a training option"):
        train(tmp_path / "no-base", tmp_path / "no-data.jsonl", out, rank=8)
    with pytest.raises(ValidationError, match=r"`options`: expected a TrainOptions, found dict"):
        train(tmp_path / "no-base", tmp_path / "no-data.jsonl", out, {"r": 8})
    assert not out.exists()


def test_train_checks_the_options_and_its_keywords_together(tmp_path):
    # Keywords override the options object; every problem of the result is listed, before any path is read.
    with pytest.raises(ValidationError) as e:
        train(tmp_path / "no-base", tmp_path / "no-data.jsonl", tmp_path / "out", TrainOptions(lr=0, r=16), r=0,
              resume="last", overwrite=True)
    assert str(e.value).startswith("train: 3 problems: `r`: expected an integer >= 1, found 0; `lr`: expected a "
                                   "number > 0, found 0; `resume` and `overwrite` together")


def test_no_field_is_hidden_by_a_keyword_of_train():
    # train's own keywords (where it runs, what it may replace, logging) are no hyperparameter: a field with one
    # of their names could never be given as a keyword.
    run_arguments = set(inspect.signature(train).parameters) - {"hyperparameters"}
    assert not run_arguments & {f.name for f in dataclasses.fields(TrainOptions)}


def test_every_field_has_a_flag_and_help_and_choices_check_themselves():
    for f in dataclasses.fields(TrainOptions):
        flag = f.metadata["flag"]
        assert flag.names and all(n.startswith("-") for n in flag.names) and flag.help.strip(), f.name
    assert dict((f.name, f.metadata["flag"].choices) for f in dataclasses.fields(TrainOptions))["scheduler"] \
        == SCHEDULERS


def test_the_options_load_without_torch():
    code = ("import sys\nfrom bora_tools.training.options import TrainOptions\nTrainOptions().problems()\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
