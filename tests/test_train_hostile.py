"""`train` on hostile inputs (issue 23, items 3, 4, 6 and 7): a base that is not what it claims, inputs that
exit 3 or eat memory, outputs checked before the work, and resuming from incomplete, corrupt or finished
checkpoints. Each refusal goes through the bad-input harness (``cli_support.clean_failure``): one line naming
the culprit, exit 1, no traceback, inputs untouched, nothing written.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cli_support import clean_failure, edit_json, first_shard, run
from safetensors.torch import load_file, save_file
from train_support import jsonl, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from bora_tools.core.adapter import load_adapter
from bora_tools.demo.tiny import TEXT, build_tokenizer
from bora_tools.io.model_dir import INDEX_FILE
from bora_tools.training import data as sft_data
from bora_tools.training.data import Record, tokenize

pytest.importorskip("accelerate")

RECORDS = [{"text": line} for line in TEXT.splitlines() if line.strip()]
QUIET = ["--quiet"]  # refusals that can only come while loading: no progress or warning line before them


@pytest.fixture
def data(tmp_path) -> Path:
    return jsonl(tmp_path / "data.jsonl", RECORDS)


def train_argv(work, data, *extra, out=None):
    return ["train", "--base", work["base"], "--data", data, "--out", out or work["outdir"] / "adapter",
            "-r", 4, "--blocks", 2, "--max-steps", 1, *extra]


def _drop_tensor(base: Path, name: str) -> None:
    """Remove one tensor from a sharded base: from its shard and from the index, as if never saved."""
    index = json.loads((base / INDEX_FILE).read_text())
    shard = base / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    (base / INDEX_FILE).write_text(json.dumps(index))


# -- 3. a base that is not what it claims -------------------------------------------------------------------


def test_a_base_missing_a_layer_weight_is_refused_not_trained_from_random_values(work, data):
    _drop_tensor(work["base"], "model.layers.1.mlp.down_proj.weight")
    clean_failure(work, train_argv(work, data, *QUIET), "--base", "missing weight", "model.layers.1.mlp.down_proj")


def test_a_base_missing_its_output_head_is_refused_unless_tied(work, data):
    config = json.loads((work["base"] / "config.json").read_text())
    assert not config.get("tie_word_embeddings"), "the tiny llama stores lm_head.weight (else this proves nothing)"
    _drop_tensor(work["base"], "lm_head.weight")
    clean_failure(work, train_argv(work, data, *QUIET), "missing weight", "lm_head.weight")


def test_a_llama_relabelled_as_bert_is_refused(work, data):
    edit_json(work["base"] / "config.json", lambda c: c.update(model_type="bert"))
    clean_failure(work, train_argv(work, data, *QUIET), "--base", "weight(s) for Bert")


def test_a_tied_base_without_lm_head_still_trains(tmp_path, data):
    from bora_tools.demo.tiny import build_model, save_model_dir

    base = save_model_dir(build_model("llama", tie=True), tmp_path / "tied")
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    result = run("train", "--base", base, "--data", data, "--out", tmp_path / "out", "-r", 4, "--blocks", 2,
                 "--max-steps", 1, "--quiet")
    assert result.exit_code == 0, result.output


# -- 4. inputs that exited 3 or ate memory -------------------------------------------------------------------


def test_a_base_without_weights_is_refused_before_any_work(work, data):
    for p in work["base"].glob("model*.safetensors*"):
        p.unlink()
    clean_failure(work, train_argv(work, data), "--base", "no weights")


def test_a_truncated_shard_is_refused_before_any_work(work, data):
    shard = first_shard(work["base"])
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    clean_failure(work, train_argv(work, data), "--base", shard.name)


def test_a_negative_head_count_is_refused(work, data):
    edit_json(work["base"] / "config.json", lambda c: c.update(num_attention_heads=-1))
    clean_failure(work, train_argv(work, data), "config.json", "num_attention_heads -1")


def test_a_junk_tokenizer_json_is_refused(work, data):
    (work["base"] / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "junk"}}')
    clean_failure(work, train_argv(work, data), "--base", "no usable tokenizer")


def test_a_chat_template_that_raises_names_the_record_and_its_message(work, tmp_path):
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate "
                "user/assistant/user/assistant/...') }}{% endif %}"
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}")
    for p in work["base"].glob("chat_template.*"):
        p.unlink()
    edit_json(work["base"] / "tokenizer_config.json", lambda c: c.update(chat_template=template))
    chats = jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]},
    ])
    clean_failure(work, train_argv(work, chats), "line 2", "chat template", "roles must alternate")


def test_a_lone_surrogate_is_named_by_line(work, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "half a pair \\ud800 here"}\n')
    clean_failure(work, train_argv(work, bad), "line 2", "lone surrogate", "U+D800")


def test_seed_minus_one_is_refused(work, data):
    clean_failure(work, train_argv(work, data, "--seed", -1), "--seed", "[0, 2**32)")


def test_a_record_over_the_bound_is_refused_without_reading_it_whole(work, tmp_path, monkeypatch):
    monkeypatch.setattr(sft_data, "MAX_RECORD_BYTES", 1 << 20)
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "short"}\n' + json.dumps({"text": "x" * (3 << 20)}) + "\n")
    clean_failure(work, train_argv(work, big), "line 2", "over 1 MiB")


class _Counting:
    """A tokenizer that records the length of every text it tokenizes and the messages it renders."""

    def __init__(self, tok):
        self.tok, self.lengths, self.rendered = tok, [], 0

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.tok(text, **kw)

    def apply_chat_template(self, messages, **kw):
        self.rendered += len(messages)
        return self.tok.apply_chat_template(messages, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_huge_text_is_cut_before_tokenizing_and_keeps_the_same_tokens():
    tok = build_tokenizer()
    huge = ("The quick brown fox jumps over the lazy dog. " * 120_000)  # 5.4 MB
    counting = _Counting(tok)
    (cut,), _ = tokenize([Record(1, "text", {"text": huge})], counting, max_length=64)
    assert max(counting.lengths) <= sft_data.char_budget(tok, 64) < 200_000  # never the whole text
    (whole,), _ = tokenize([Record(1, "text", {"text": huge[:20_000]})], tok, max_length=64)
    assert cut == whole  # the cut changes nothing max_length keeps


def test_a_chat_of_thousands_of_turns_renders_only_what_max_length_keeps():
    tok = build_tokenizer()
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(4000)]
    counting = _Counting(tok)
    (long_chat,), _ = tokenize([Record(1, "messages", {"messages": turns})], counting, max_length=128)
    assert counting.rendered < 20_000  # every prefix of 4000 turns rendered would be about 8,000,000
    (short_chat,), _ = tokenize([Record(1, "messages", {"messages": turns[:60]})], tok, max_length=128)
    assert long_chat == short_chat and len(long_chat["input_ids"]) == 128


# -- 6. outputs checked before the work -----------------------------------------------------------------------


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(directory)``: ``statvfs`` reports a read-only mount there (as root, permission bits do not
    stop a write; a read-only mount does)."""
    real = os.statvfs
    marked: list[Path] = []

    class _Result:
        def __init__(self, real_result):
            self.f_flag = real_result.f_flag | os.ST_RDONLY

    def statvfs(path):
        result = real(path)
        return _Result(result) if any(Path(path).resolve() == m.resolve() for m in marked) else result

    monkeypatch.setattr(os, "statvfs", statvfs)
    return marked.append


def test_train_refuses_a_read_only_output_parent_before_loading_anything(work, data, read_only):
    read_only(work["outdir"])
    clean_failure(work, train_argv(work, data), "output", "read-only file system")


def test_train_refuses_a_read_only_checkpoint_dir_before_loading_anything(work, data, read_only, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    read_only(ckpts)
    clean_failure(work, train_argv(work, data, "--save-steps", 1, "--checkpoint-dir", ckpts),
                  "--checkpoint-dir", "read-only file system")


@pytest.mark.parametrize("command", ["merge", "to-lora", "gguf-lora"])
def test_other_commands_refuse_a_read_only_output_parent_too(work, read_only, command):
    read_only(work["outdir"])
    clean_failure(work, command, "output", "read-only file system")


# -- 7. resume: incomplete, corrupt and finished checkpoints ------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, pristine):
    """A 2-step run with a checkpoint at each step (shared, read only: tests copy it)."""
    root = tmp_path_factory.mktemp("ckpt")
    data = jsonl(root / "data.jsonl", RECORDS)
    result = run("train", "--base", pristine["base"], "--data", data, "--out", root / "adapter", "-r", 4,
                 "--blocks", 2, "--max-steps", 2, "--save-steps", 1, "--batch-size", 2, "--quiet")
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def ckpts(checkpointed, tmp_path) -> Path:
    return Path(shutil.copytree(checkpointed / "adapter-checkpoints", tmp_path / "ckpts"))


def resume_argv(work, checkpointed, ckpts, *extra, max_steps=2):
    steps = ["--max-steps", max_steps] if max_steps is not None else ["--epochs", 0.5]  # 7 examples: 2 steps
    return ["train", "--base", work["base"], "--data", checkpointed / "data.jsonl", "--out",
            work["outdir"] / "adapter", "-r", 4, "--blocks", 2, *steps, "--save-steps", 1,
            "--batch-size", 2, "--checkpoint-dir", ckpts, *extra]


def test_the_checkpoints_hold_every_file_resume_needs(ckpts):
    from bora_tools.training.resume import missing_files

    assert [p.name for p in sorted(ckpts.iterdir())] == ["checkpoint-1", "checkpoint-2"]
    assert missing_files(ckpts / "checkpoint-1") == [] == missing_files(ckpts / "checkpoint-2")


@pytest.mark.parametrize("name", ["scheduler.pt", "optimizer.pt", "rng_state.pth", "trainer_state.json"])
def test_resuming_from_a_named_incomplete_checkpoint_is_refused_naming_the_file(work, checkpointed, ckpts, name):
    (ckpts / "checkpoint-1" / name).unlink()
    argv = resume_argv(work, checkpointed, ckpts, "--resume", ckpts / "checkpoint-1", max_steps=3)
    clean_failure(work, argv, "--resume", "incomplete checkpoint", name)


@pytest.mark.parametrize("name,spoil", [
    ("optimizer.pt", lambda p: p.write_bytes(b"not a torch file")),
    ("rng_state.pth", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    ("scheduler.pt", lambda p: p.write_bytes(p.read_bytes()[:-40] + b"\0" * 40)),
    ("trainer_state.json", lambda p: p.write_text('{"global_step": "two"}')),
    ("adapter_model.safetensors", lambda p: p.write_bytes(b"\x10\0\0\0\0\0\0\0{junk}")),
])
def test_a_corrupt_checkpoint_file_is_named_with_an_earlier_checkpoint_to_use(work, checkpointed, ckpts, name, spoil):
    spoil(ckpts / "checkpoint-2" / name)
    argv = resume_argv(work, checkpointed, ckpts, "--resume", max_steps=3)
    line = clean_failure(work, argv, "--resume", "checkpoint-2", "corrupt")
    assert name in line or name == "adapter_model.safetensors"
    assert "checkpoint-1" in line  # the way on: the checkpoint before


@pytest.mark.slow
def test_an_incomplete_latest_checkpoint_falls_back_to_the_last_complete_one(work, checkpointed, ckpts):
    (ckpts / "checkpoint-2" / "scheduler.pt").unlink()  # a run killed while writing it
    result = run(*resume_argv(work, checkpointed, ckpts, "--resume", "--json"))
    assert result.exit_code == 0, result.output
    assert "checkpoint-2 is incomplete (no scheduler.pt)" in result.stderr
    report = json.loads(result.stdout)
    assert report["resumed_from"].endswith("checkpoint-1") and report["steps"] == 2
    uninterrupted = load_adapter(checkpointed / "adapter").state_dict()
    resumed = load_adapter(work["outdir"] / "adapter").state_dict()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("max_steps,state_step", [(2, None), (1, None), (1, 999999), (None, None)])
def test_resuming_a_finished_run_says_so_and_trains_nothing(work, checkpointed, ckpts, max_steps, state_step):
    if state_step is not None:  # a checkpoint past any plan
        edit_json(ckpts / "checkpoint-2" / "trainer_state.json", lambda s: s.update(global_step=state_step))
    before = sorted(p.name for p in work["outdir"].iterdir())
    result = run(*resume_argv(work, checkpointed, ckpts, "--resume", "--json", max_steps=max_steps))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["step"] == (state_step or 2) and report["planned_steps"] == (max_steps or 2)
    assert "step" not in result.stderr and "loss" not in result.stdout  # no training line
    assert sorted(p.name for p in work["outdir"].iterdir()) == before  # nothing written
    text = run(*resume_argv(work, checkpointed, ckpts, "--resume", max_steps=max_steps))
    assert "the run is already finished" in text.stdout and "nothing trained" in text.stdout


def test_resuming_a_finished_run_whose_out_exists_is_not_an_error(checkpointed, ckpts, work):
    shutil.copytree(checkpointed / "adapter", work["outdir"] / "adapter")  # the finished run's OUT
    result = run(*resume_argv(work, checkpointed, ckpts, "--resume"))
    assert result.exit_code == 0, result.output
    assert "already finished" in result.stdout and "left as it is" in result.stdout

