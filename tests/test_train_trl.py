"""`train`'s conveniences from TRL (issue 21): an eval set and its loss, packing, ShareGPT and conversational
prompt/completion records, a YAML config file, TRL's long flag names; bad inputs one line each."""

import json

import pytest
import torch
from cli_support import clean_failure, run
from train_support import jsonl, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from bora_tools.demo.tiny import TEXT, build_model, build_tokenizer
from bora_tools.training import load_bora
from bora_tools.training.data import IGNORE_INDEX, Collator, read_records, tokenize
from bora_tools.training.evaluation import split
from bora_tools.training.packing import PackedCollator, pack

pytest.importorskip("accelerate")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who jumps?"},
        {"role": "assistant", "content": "The quick brown fox."}, {"role": "user", "content": "Over what?"},
        {"role": "assistant", "content": "The lazy dog."}]
SHAREGPT = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                               "value": m["content"]} for m in CHAT]}
RECORDS = [{"text": line} for line in TEXT.splitlines() if line.strip()] + [
    {"prompt": "Q: what jumps? A:", "completion": " the quick brown fox"}, {"messages": CHAT}, SHAREGPT,
    {"prompt": CHAT[:3] + CHAT[3:4], "completion": CHAT[4:]},
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, llama_base):
    root = tmp_path_factory.mktemp("trl")
    return llama_base, jsonl(root / "data.jsonl", RECORDS)


def train_args(inputs, out, *extra):
    base, data = inputs
    return ["train", "--base", base, "--data", data, "--out", out, "-r", 4, "--blocks", 2, "--lr", 2e-2,
            "--batch-size", 4, *extra]


# -- records: ShareGPT and conversational prompt/completion --------------------------------------------------


def _tokenized(records, tmp_path, max_length=512):
    return tokenize(read_records(jsonl(tmp_path / "r.jsonl", records)), build_tokenizer(), max_length=max_length)[0]


def test_sharegpt_records_train_exactly_as_the_same_messages(tmp_path):
    sharegpt, messages = _tokenized([SHAREGPT, {"messages": CHAT}], tmp_path)
    assert sharegpt == messages
    assert any(label != IGNORE_INDEX for label in sharegpt["labels"])


def test_conversational_prompt_completion_learns_the_completion_only(tmp_path):
    conv, whole = _tokenized([{"prompt": CHAT[:4], "completion": CHAT[4:]}, {"messages": CHAT}], tmp_path)
    tok = build_tokenizer()
    assert conv["input_ids"] == whole["input_ids"]  # the same conversation, rendered whole
    learnt = tok.decode([t for t, label in zip(conv["input_ids"], conv["labels"]) if label != IGNORE_INDEX])
    assert learnt == "The lazy dog.</s>\n"  # the prompt's assistant turn (a few-shot example) is not learnt
    assert "The quick brown fox." in tok.decode([t for t, label in zip(whole["input_ids"], whole["labels"])
                                                 if label != IGNORE_INDEX])


# -- packing --------------------------------------------------------------------------------------------------


def test_packing_keeps_every_example_whole_and_attends_within_each(tmp_path):
    examples = _tokenized(RECORDS, tmp_path, max_length=128)
    rows = pack(examples, 128)
    sizes = [len(r["input_ids"]) for r in rows]
    assert len(rows) < len(examples) and max(sizes) <= 128
    assert all(a + b > 128 for i, a in enumerate(sizes) for b in sizes[i + 1:])  # no two rows would fit in one
    starts = [i for r in rows for i, p in enumerate(r["position_ids"]) if p == 0]
    assert len(starts) == len(examples)
    key = lambda e: (tuple(e["input_ids"]), tuple(e["labels"]))  # noqa: E731
    assert sorted(map(key, _segments(rows))) == sorted(map(key, examples))  # each example once, labels kept

    model = build_model("llama").eval()
    batch = PackedCollator()(rows[:2])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # TRL's padding-free layout
    assert (batch["labels"][0][batch["position_ids"][0] == 0] == IGNORE_INDEX).all()
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        segments = _segments(rows[:2])
        at = 0
        for ids in [s["input_ids"] for s in segments]:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[at:at + len(ids)], alone, rtol=0, atol=1e-5)
            at += len(ids)
        # the loss over the packed batch is the loss over the same examples unpadded and unpacked
        unpacked = Collator(2)(segments)
        model.train()  # a training step's forward (no dropout in the tiny llama): the layout holds there too
        packed_loss = model(**batch).loss
        loss = model(**unpacked).loss
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_every_family_attends_within_each_packed_example(arch):
    model = build_model(arch).eval()
    a, b = [0, 5, 6, 7, 8], [0, 9, 10, 11]
    batch = PackedCollator()([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        for ids, part in ((a, packed[:5]), (b, packed[5:])):
            torch.testing.assert_close(part, model(input_ids=torch.tensor([ids])).logits[0], rtol=0, atol=1e-5)


def _segments(rows):
    out = []
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        out += [{"input_ids": r["input_ids"][a:b], "labels": r["labels"][a:b]} for a, b in zip(starts, starts[1:])]
    return out


@pytest.mark.slow
def test_packed_training_lowers_the_loss(tmp_path, inputs):
    result = run(*train_args(inputs, tmp_path / "out", "--packing", "--max-length", 128, "--max-steps", 8,
                             "--logging-steps", 1, "--batch-size", 2, "--quiet", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["packed_rows"] < report["examples"] == len(RECORDS)
    assert report["loss_last"] < report["loss_first"] - 0.3, report["losses"]


# -- eval -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_fraction_reports_the_held_out_loss_of_the_trained_adapter(tmp_path, inputs):
    out = tmp_path / "out"
    result = run(*train_args(inputs, out, "--eval-fraction", 0.25, "--eval-steps", 2, "--max-steps", 4,
                             "--logging-steps", 1, "--max-length", 64, "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [step for step, _ in report["eval_losses"]] == [2, 4]
    examples = tokenize(read_records(inputs[1]), build_tokenizer(), max_length=64)[0]
    assert report["eval_examples"] == round(0.25 * len(examples)) and report["examples"] == len(examples) - 2
    assert "step 2/4  eval loss" in result.stderr and "step 4/4  eval loss" in result.stderr
    # the reported loss is the trained adapter's loss on the held-out examples
    _, held = split(examples, 0.25, seed=0, data=inputs[1])
    model = load_bora(build_model("llama"), out).eval()
    with torch.no_grad():
        loss = model(**Collator(2)(held)).loss
    assert abs(float(loss) - report["eval_loss"]) < 1e-4
    assert report["eval_loss"] == report["eval_losses"][-1][1]


@pytest.mark.slow
def test_eval_data_is_evaluated_at_the_end(tmp_path, inputs):
    held = jsonl(tmp_path / "eval.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}])
    result = run(*train_args(inputs, tmp_path / "out", "--eval-data", held, "--max-steps", 2, "--json", "--quiet"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["eval_examples"] == 1 and [s for s, _ in report["eval_losses"]] == [2]
    assert 0 < report["eval_loss"] < 20


# -- config file, TRL's flag names ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_config_file_sets_the_options_and_flags_win(tmp_path, inputs):
    base, data = inputs
    config = tmp_path / "run.yaml"
    config.write_text(f"base: {base}\ndata: {data}\nout: {tmp_path / 'out'}\nrank: 2\nblocks: 2\n"
                      f"learning_rate: 1e-2\nmax-steps: 3\nper_device_train_batch_size: 2\n"
                      f"target_modules: [q_proj, v_proj]\n")
    result = run("train", "--config", config, "--max-steps", 1, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["r"], report["blocks"], report["steps"], report["global_batch"]) == (2, 2, 1, 2)
    assert report["target_modules"] == ["q_proj", "v_proj"] and report["modules"] == 4


@pytest.mark.parametrize("alias,flag", [
    ("--learning-rate", "--lr"), ("--num-train-epochs", "--epochs"),
    ("--per-device-train-batch-size", "--batch-size"), ("--gradient-accumulation-steps", "--grad-accum"),
])
def test_trl_long_flag_names_set_the_same_options(work, tmp_path, alias, flag):
    data = jsonl(tmp_path / "d.jsonl", RECORDS)
    argv = ["train", "--base", work["base"], "--data", data, "--out", work["outdir"] / "a", alias, 0]
    clean_failure(work, argv, f"{flag}: expected")  # the alias set the option the flag sets


# -- bad inputs -----------------------------------------------------------------------------------------------


def _cases(tmp_path):
    data = jsonl(tmp_path / "d.jsonl", RECORDS)
    return data, {
        "eval_missing": (["--eval-data", tmp_path / "nope.jsonl"], ["--eval-data", "no such file"]),
        "eval_both": (["--eval-data", data, "--eval-fraction", 0.1], ["--eval-data", "--eval-fraction"]),
        "eval_steps_alone": (["--eval-steps", 2], ["--eval-steps", "without an eval set"]),
        "eval_fraction_range": (["--eval-fraction", 1.0], ["--eval-fraction", "(0, 1)"]),
        "eval_fraction_all": (["--eval-fraction", 0.99], ["--eval-fraction", "leaves none to train on"]),
        "sharegpt_from": (["--data", jsonl(tmp_path / "s.jsonl", [{"conversations": [
            {"from": "human", "value": "hi"}, {"from": "bot", "value": "hey"}]}])], ["line 1", "'bot'"]),
        "conversational_completion": (["--data", jsonl(tmp_path / "c.jsonl", [{"prompt": CHAT[:2],
                                                                                 "completion": "text"}])],
                                      ["line 1", "'completion' must be one too"]),
        "config_unknown": (["--config", _yaml(tmp_path, "lerning_rate: 0.1\n")],
                           ["--config", "'lerning_rate' is not an option", "learning_rate"]),
        "config_not_mapping": (["--config", _yaml(tmp_path, "- lr\n")], ["--config", "expected a mapping"]),
        "config_bad_yaml": (["--config", _yaml(tmp_path, "lr: [1\n")], ["--config", "not valid YAML"]),
    }


def _yaml(tmp_path, text):
    path = tmp_path / f"c{abs(hash(text))}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["eval_missing", "eval_both", "eval_steps_alone", "eval_fraction_range",
                                  "eval_fraction_all", "sharegpt_from", "conversational_completion",
                                  "config_unknown", "config_not_mapping", "config_bad_yaml"])
def test_each_bad_input_is_one_line(work, tmp_path, case):
    data, cases = _cases(tmp_path)
    extra, culprits = cases[case]
    argv = ["train", "--base", work["base"], "--data", data, "--out", work["outdir"] / "a", "-r", 4,
            "--blocks", 2, "--max-steps", 1, *extra]
    if "--data" in extra:  # the case's own data file replaces the good one
        at = argv.index("--data")
        del argv[at:at + 2]
    clean_failure(work, argv, *culprits)


# -- push at the end ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_push_to_hub_at_the_end_uploads_out_with_a_card_recording_the_training(tmp_path, inputs, monkeypatch):
    import hashlib

    import huggingface_hub.constants
    from hub_server import FakeHub
    from huggingface_hub import ModelCard

    from bora_tools.core.adapter import load_adapter

    token = "hf_test_write_token"
    with FakeHub(tokens={token: "write"}) as hub:
        # what HF_ENDPOINT and HF_HUB_DISABLE_XET=1 set when huggingface_hub is imported (the fake Hub has no Xet)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", token)
        out = tmp_path / "out"
        result = run(*train_args(inputs, out, "--max-steps", 2, "--eval-fraction", 0.2, "--push-to-hub",
                                 "me/my-bora", "--quiet", "--json"))
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["pushed"]["repo_id"] == "me/my-bora" and report["pushed"]["commit"] is not None
        files = hub.files("me/my-bora")
        files.pop(".gitattributes")  # the Hub's own, made with the repo
    local = {p.name: p.read_bytes() for p in out.iterdir()}
    assert files == local  # OUT went up whole: adapter, tokenizer and the card written into it
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"):
        assert name in files, name
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (pushed / name).write_bytes(files[name])
    assert load_adapter(pushed).state_dict().keys() == load_adapter(out).state_dict().keys()
    card = ModelCard(files["README.md"].decode())
    sha = hashlib.sha256(inputs[1].read_bytes()).hexdigest()
    assert f"`data.jsonl` (sha256 `{sha}`)" in card.text
    for row in ("| steps | 2 |", f"| final train loss | {report['loss_last']:.4f} |",
                f"| final eval loss | {report['eval_loss']:.4f} |", "| b (blocks) | 2 |", "| r | 4 |",
                "| `lr` | `0.02` |", "| `eval_fraction` | `0.2` |"):
        assert row in card.text, row
    assert card.data.library_name or card.data.tags  # push's own card metadata is kept


@pytest.mark.parametrize("repo,env,culprit", [
    ("not-a-repo", {"HF_TOKEN": "hf_x"}, "not a Hub repo id"),
    ("me/../x", {"HF_TOKEN": "hf_x"}, "not a Hub repo id"),
    ("me/fine", {}, "no Hub token"),
])
def test_push_to_hub_is_checked_before_training(work, tmp_path, monkeypatch, repo, env, culprit):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    data = jsonl(tmp_path / "d.jsonl", RECORDS)
    argv = ["train", "--base", work["base"], "--data", data, "--out", work["outdir"] / "a", "--push-to-hub", repo]
    clean_failure(work, argv, "--push-to-hub", culprit)
