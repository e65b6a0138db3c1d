"""`bora-tools train`: lowers the loss, writes an adapter the other commands read, masks prompts, resumes,
and refuses every bad input in one line before doing any work."""

import json
import re

import pytest
import torch
from cli_support import run
from train_support import one_thread  # noqa: F401 (one_thread: an autouse fixture)
from transformers import AutoTokenizer

from bora_tools.core.adapter import load_adapter
from bora_tools.demo.tiny import TEXT, build_model, build_tokenizer, save_model_dir
from bora_tools.training import load_bora
from bora_tools.training.data import IGNORE_INDEX, Record, tokenize

pytest.importorskip("accelerate")

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who jumps?"},
                     {"role": "assistant", "content": "The quick brown fox."},
                     {"role": "user", "content": "Over what?"}, {"role": "assistant", "content": "The lazy dog."}]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = save_model_dir(build_model("llama"), root / "base")
    records = [{"text": line} for line in TEXT.splitlines() if line.strip()]
    records += [{"prompt": "Q: what jumps? A:", "completion": " the quick brown fox"}, CHAT]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return base, data


def train_args(inputs, out, *extra):
    base, data = inputs
    return ["train", "--base", base, "--data", data, "--out", out, "-r", 4, "--blocks", 2, "--lr", 2e-2,
            "--batch-size", 4, "--quiet", *extra]


@pytest.mark.slow
def test_train_lowers_the_loss_and_writes_an_adapter_that_inspect_and_load_read(tmp_path, inputs):
    out = tmp_path / "adapter"
    result = run(*train_args(inputs, out, "--max-steps", 15, "--logging-steps", 1, "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 15 and report["examples"] == 9 and report["tokens"] > 0
    assert report["loss_last"] < report["loss_first"] - 0.3, report["losses"]
    assert report["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not {p.name for p in out.iterdir()} & {"model.safetensors.index.json", "trainer_state.json"}
    tok, saved = build_tokenizer(), AutoTokenizer.from_pretrained(out)  # the tokenizer travels with the adapter
    assert saved(TEXT).input_ids == tok(TEXT).input_ids and saved.chat_template == tok.chat_template
    assert not (tmp_path / "adapter-checkpoints").exists()  # no --save-steps, no checkpoints

    adapter = load_adapter(out)
    assert len(adapter.modules) == report["modules"] == 14
    assert adapter.num_parameters == report["trainable_parameters"]
    assert (adapter.config.r, adapter.config.bora_blocks) == (4, 2)
    inspected = run("inspect", out, "--json")
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["total_parameters"] == report["trainable_parameters"]

    ids = torch.tensor([[0, 5, 17, 42, 99]])
    base = build_model("llama")
    trained = load_bora(build_model("llama"), out).eval()
    with torch.no_grad():
        assert (trained(ids).logits - base(ids).logits).abs().max() > 1e-2  # it learnt something


def test_the_loss_is_taken_on_completions_and_assistant_turns_only():
    tok = build_tokenizer()
    records = [Record(1, "prompt", {"prompt": "Q: what jumps? A:", "completion": " the quick brown fox"}),
               Record(2, "messages", CHAT), Record(3, "text", {"text": "The lazy dog."})]
    (prompt, chat, text), stats = tokenize(records, tok, max_length=512)
    n_prompt = len(tok("Q: what jumps? A:").input_ids)
    assert prompt["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert prompt["labels"][n_prompt:] == prompt["input_ids"][n_prompt:]
    assert tok.decode(prompt["input_ids"][n_prompt:]) == " the quick brown fox</s>"

    learnt = [t for t, label in zip(chat["input_ids"], chat["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(learnt) == "The quick brown fox.</s>\nThe lazy dog.</s>\n"  # both turns and their ends
    prompt_part = tok.decode([t for t, label in zip(chat["input_ids"], chat["labels"]) if label == IGNORE_INDEX])
    assert "Who jumps?" in prompt_part and "Be brief." in prompt_part and "assistant: " in prompt_part
    assert tok.decode(chat["input_ids"]) == tok.apply_chat_template(CHAT["messages"], tokenize=False)

    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == tok.eos_token_id
    assert stats.kinds == {"prompt": 1, "messages": 1, "text": 1} and stats.truncated == 0

    (cut,), stats = tokenize(records[:1], tok, max_length=n_prompt + 2)  # cut inside the completion
    assert len(cut["input_ids"]) == n_prompt + 2 and stats.truncated == 1
    _, stats = tokenize(records[:1], tok, max_length=n_prompt)  # nothing left to learn: dropped
    assert stats.dropped == [1]


@pytest.mark.slow
def test_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path, inputs):
    first = run(*train_args(inputs, tmp_path / "a", "--max-steps", 6, "--save-steps", 3))
    assert first.exit_code == 0, first.output
    ckpts = tmp_path / "a-checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert not (ckpts / "checkpoint-3" / "model.safetensors").exists()
    (ckpts / "checkpoint-6").rename(tmp_path / "moved")  # as if the run had stopped after step 3
    second = run(*train_args(inputs, tmp_path / "b", "--max-steps", 6, "--save-steps", 3,
                             "--checkpoint-dir", ckpts, "--resume", "--json"))
    assert second.exit_code == 0, second.output
    report = json.loads(second.stdout)
    assert report["resumed_from"].endswith("checkpoint-3") and report["steps"] == 6
    a, b = load_adapter(tmp_path / "a").state_dict(), load_adapter(tmp_path / "b").state_dict()
    at3 = load_adapter(ckpts / "checkpoint-3").state_dict()
    assert max(float((a[k] - at3[k]).abs().max()) for k in a) > 1e-3  # steps 4-6 moved the adapter
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_overwrite_clears_the_earlier_checkpoints_and_nothing_else(tmp_path, inputs):
    ckpts = tmp_path / "adapter-checkpoints"
    (ckpts / "checkpoint-7").mkdir(parents=True)
    (ckpts / "notes.txt").write_text("keep me")
    (tmp_path / "adapter").mkdir()
    result = run(*train_args(inputs, tmp_path / "adapter", "--max-steps", 2, "--save-steps", 2, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "notes.txt"]
    assert load_adapter(tmp_path / "adapter").config.r == 4  # the old OUT was replaced whole


def _bad_line(tmp_path, text):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case,expected", [
    ("empty", r"--data .*empty\.jsonl: no records"),
    ("missing", r"--data .*nope\.jsonl: no such file"),
    ("not_json", r"line 2: not valid JSON"),
    ("shape", r"line 3: 'prompt' without 'completion'"),
    ("no_assistant", r"line 1: 'messages' has no \"assistant\" turn"),
    ("blocks", r"--blocks 3 does not fit: model\.layers\.0\.self_attn\.q_proj: out_features m=64 is not divisible"),
    ("target", r"--target-modules 'qproj' match\(es\) no linear module of LlamaForCausalLM"),
    ("rank", r"-r: expected an integer >= 1, found 0"),
    ("exists", r"output .*adapter already exists"),
    ("resume", r"--resume: no checkpoint-N directory in"),
    ("inside", r"is, contains or lies inside the input"),
    ("base", r"--base .*: no config\.json"),
    ("float16", r"--dtype float16 training needs a CUDA device"),
    ("earlier", r"checkpoint directory .* holds checkpoints of an earlier run \(pass --resume to continue it"),
])
def test_every_bad_input_gets_one_line_and_nothing_is_written(tmp_path, inputs, case, expected):
    base, data = inputs
    out = tmp_path / "adapter"
    extra: list = []
    if case == "empty":
        data = _bad_line(tmp_path, "\n\n").rename(tmp_path / "empty.jsonl")
    elif case == "missing":
        data = tmp_path / "nope.jsonl"
    elif case == "not_json":
        data = _bad_line(tmp_path, '{"text": "a"}\n{"text": \n')
    elif case == "shape":
        data = _bad_line(tmp_path, '{"text": "a"}\n\n{"prompt": "x"}\n')
    elif case == "no_assistant":
        data = _bad_line(tmp_path, json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    elif case == "blocks":
        extra = ["--blocks", 3]
    elif case == "target":
        extra = ["--target-modules", "q_proj,qproj"]
    elif case == "rank":
        extra = ["-r", 0]
    elif case == "exists":
        out.mkdir()
    elif case == "resume":
        extra = ["--resume"]
    elif case == "inside":
        out = base / "adapter"
    elif case == "base":
        base = tmp_path / "empty-base"
        base.mkdir()
    elif case == "float16":
        extra = ["--dtype", "float16", "--device", "cpu"]
    elif case == "earlier":
        (tmp_path / "adapter-checkpoints" / "checkpoint-1").mkdir(parents=True)
        extra = ["--save-steps", 1]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("train", "--base", base, "--data", data, "--out", out, "-r", 4, "--blocks", 2, "--max-steps", 1,
                 *extra)
    assert result.exit_code == 1, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("Error: "), result.stderr
    assert re.search(expected, result.stderr), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no checkpoint dir, no temp
    assert not (base / "adapter").exists()
