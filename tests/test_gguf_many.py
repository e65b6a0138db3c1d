"""export-gguf: several --outtype in one run, --split-max-size, --modelfile.

- several types: the source is read (and an adapter merged) once, each file is byte-identical to the
  one a run of its own type writes, and every file is complete or absent;
- split files: llama.cpp's ``NAME-0000k-of-0000N.gguf`` with the ``split.*`` keys gguf-split writes,
  loaded by llama.cpp from the first file with the same logits as the single file;
- the Ollama Modelfile, read back by a parser written from Ollama's documentation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from cli_support import run

import bora_tools.core.row_merge as row_merge
import bora_tools.gguf.plan as plan_module
from bora_tools.errors import OutputExistsError, ValidationError
from bora_tools.gguf.export import export_gguf, export_gguf_many
from bora_tools.gguf.split import parse_split_size
from tests.gguf_support import IDS, gguf_logits, llama_with_adapter, needs_llama_cpp

SHARD = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A float32 Llama with rows a multiple of 256, and a BoRA adapter for it."""
    base, adapter = llama_with_adapter(tmp_path_factory.mktemp("many"))
    return {"llama": base, "adapter": adapter}


@pytest.fixture
def reads(monkeypatch):
    """Counts the tensors read from a checkpoint (each read goes through ``stream_rows``)."""
    seen: list[str] = []
    original = plan_module.stream_rows

    def counting(entry, *args, **kwargs):
        seen.append(entry.name)
        return original(entry, *args, **kwargs)

    monkeypatch.setattr(plan_module, "stream_rows", counting)
    return seen


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----- several types in one run -------------------------------------------------------------------------
@needs_llama_cpp
@pytest.mark.slow
def test_three_types_read_the_source_once_and_match_three_runs(models, tmp_path, reads):
    single = {}
    for t in ("q8_0", "f16", "q4_k_m"):
        single[t] = tmp_path / "single" / f"{t}.gguf"
        export_gguf(models["llama"], single[t], outtype=t, threads=1)
    reads_per_run = len(reads) // 3
    reads.clear()
    report = export_gguf_many(models["llama"], tmp_path / "out", outtypes=["q8_0", "f16", "q4_k_m"], threads=1)
    assert len(reads) == reads_per_run > 0  # every tensor read once, not once per type
    assert [Path(r.out).name for r in report.files] == ["llama-q8_0.gguf", "llama-f16.gguf", "llama-q4_k_m.gguf"]
    assert files_in(tmp_path / "out") == ["llama-f16.gguf", "llama-q4_k_m.gguf", "llama-q8_0.gguf"]  # no leftovers
    for r in report.files:
        assert Path(r.out).read_bytes() == single[r.outtype].read_bytes(), r.outtype
        assert r.bytes == Path(r.out).stat().st_size
    q4 = report.files[2]
    assert q4.types == {"F32": 5, "Q4_K": 13, "Q6_K": 3} and q4.intermediate["types"] == {"F32": 21}
    d = report.to_dict()
    assert [f["outtype"] for f in d["files"]] == ["q8_0", "f16", "q4_k_m"]


@pytest.mark.slow
def test_a_merge_into_several_types_merges_once(models, tmp_path, monkeypatch):
    merges: list[str] = []
    original = row_merge.stream_rows

    def counting(entry, replacement, *args, **kwargs):
        if replacement is not None:
            merges.append(entry.name)
        return original(entry, replacement, *args, **kwargs)

    monkeypatch.setattr(plan_module, "stream_rows", counting)
    single = tmp_path / "f32.gguf"
    export_gguf(models["adapter"], single, base=models["llama"], merge=True, outtype="f32")
    once = len(merges)
    merges.clear()
    report = export_gguf_many(models["adapter"], tmp_path / "out", base=models["llama"], merge=True,
                              outtypes=["f32", "bf16"])
    assert len(merges) == once > 0
    assert [Path(r.out).name for r in report.files] == ["adapter-merged-f32.gguf", "adapter-merged-bf16.gguf"]
    assert Path(report.files[0].out).read_bytes() == single.read_bytes()
    assert all(r.kind == "merged" and r.merged_tensors == once for r in report.files)


def test_a_failure_leaves_none_of_the_files(models, tmp_path, monkeypatch):
    import bora_tools.gguf.quantize as quantize

    def broken(src, dst, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quantize, "quantize_file", broken)
    out = tmp_path / "out"
    out.mkdir()
    result = run("export-gguf", models["llama"], "--out", out, "--outtype", "f16", "--outtype", "q4_k_m", "--quiet")
    assert result.exit_code == 1 and result.stderr.count("Error:") == 1, result.stderr
    assert "no space left on device" in result.stderr
    assert files_in(out) == []  # the f16 file, complete by then, went too: none or all


def test_lora_in_two_types(models, tmp_path):
    report = export_gguf_many(models["adapter"], tmp_path, base=models["llama"], outtypes=["f32", "q8_0"])
    assert [(r.kind, Path(r.out).name) for r in report.files] == [("lora", "adapter-lora-f32.gguf"),
                                                                  ("lora", "adapter-lora-q8_0.gguf")]


def test_cli_writes_one_report_per_file(models, tmp_path):
    result = run("export-gguf", models["llama"], "--out", f"{tmp_path}/", "--outtype", "f16", "--outtype", "Q8_0",
                 "--json")
    assert result.exit_code == 0, result.stderr
    d = json.loads(result.stdout)
    assert [Path(f["out"]).name for f in d["files"]] == ["llama-f16.gguf", "llama-q8_0.gguf"]
    assert all(f["kind"] == "model" and f["bytes"] > 0 for f in d["files"])
    text = run("export-gguf", models["llama"], "--out", f"{tmp_path}/t/", "--outtype", "f32", "--outtype", "bf16")
    assert text.exit_code == 0 and "2 files from one read of the source" in text.stdout


@pytest.mark.parametrize("args, words", [
    (["--outtype", "f16", "--outtype", "q8_0", "--out", "{tmp}/one.gguf"], "give --out a folder"),
    (["--outtype", "f16", "--outtype", "fp16", "--out", "{tmp}/"], "each type once"),
])
def test_several_types_usage_errors(models, tmp_path, args, words):
    result = run("export-gguf", models["llama"], *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2 and words in result.stderr, result.stderr
    assert files_in(tmp_path) == []


def test_an_existing_file_is_refused_before_any_is_written(models, tmp_path):
    (tmp_path / "llama-q8_0.gguf").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="llama-q8_0.gguf"):
        export_gguf_many(models["llama"], tmp_path, outtypes=["f16", "q8_0"])
    assert files_in(tmp_path) == ["llama-q8_0.gguf"] and (tmp_path / "llama-q8_0.gguf").read_bytes() == b"old"


# ----- split files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [("500M", 500_000_000), ("4G", 4_000_000_000), ("2k", 2000), ("123", 123),
                                        (1000, 1000)])
def test_split_sizes(text, size):
    assert parse_split_size(text) == size


@pytest.mark.parametrize("text", ["0", "4T", "-1M", "1.5G", "big", ""])
def test_bad_split_sizes(text):
    with pytest.raises(ValidationError, match="`split_max_size`"):
        parse_split_size(text)


def split_keys(path: Path) -> dict[str, int]:
    reader = gguf.GGUFReader(path)
    return {k: int(reader.fields[k].contents()) for k in ("split.no", "split.count", "split.tensors.count")
            if k in reader.fields}


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_k_m"])
def test_split_files_load_from_the_first_with_the_single_files_logits(models, tmp_path, outtype):
    single = tmp_path / "single.gguf"
    export_gguf(models["llama"], single, outtype=outtype)
    out = tmp_path / "split" / "m.gguf"
    limit = single.stat().st_size // 3  # at least three shards
    report = export_gguf(models["llama"], out, outtype=outtype, split_max_size=limit)
    names = files_in(out.parent)
    count = len(names)
    assert count >= 3 and names == [f"m-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    assert report.out == str(out.parent / names[0]) and report.shards == [str(out.parent / n) for n in names]
    reader = gguf.GGUFReader(single)
    total = len(reader.tensors)
    seen = []
    for i, name in enumerate(names):
        assert split_keys(out.parent / name) == {"split.no": i, "split.count": count, "split.tensors.count": total}
        shard = gguf.GGUFReader(out.parent / name)
        seen += [(t.name, t.tensor_type, bytes(t.data)) for t in shard.tensors]
        assert sum(int(t.n_bytes) for t in shard.tensors) <= limit or len(shard.tensors) == 1
    assert seen == [(t.name, t.tensor_type, bytes(t.data)) for t in reader.tensors]  # same tensors, same bytes
    assert report.bytes == sum((out.parent / n).stat().st_size for n in names)
    np.testing.assert_array_equal(gguf_logits(out.parent / names[0], IDS), gguf_logits(single, IDS))


def test_split_cli_and_overwrite_replaces_the_old_split_whole(models, tmp_path):
    out = tmp_path / "m.gguf"
    first = run("export-gguf", models["llama"], "--out", out, "--outtype", "f32", "--split-max-size", "1000K")
    assert first.exit_code == 0, first.stderr
    old = files_in(tmp_path)
    assert len(old) >= 4 and all(SHARD.match(n) for n in old) and "split:" in first.stdout
    again = run("export-gguf", models["llama"], "--out", out, "--outtype", "f32", "--split-max-size", "2M")
    assert again.exit_code == 1 and "already exists" in again.stderr and files_in(tmp_path) == old
    third = run("export-gguf", models["llama"], "--out", out, "--outtype", "f32", "--split-max-size", "2M",
                "--overwrite")
    assert third.exit_code == 0, third.stderr
    new = files_in(tmp_path)
    assert len(new) < len(old) and all(n.endswith(f"-of-{len(new):05d}.gguf") for n in new)


def test_a_model_that_fits_is_one_plain_file(models, tmp_path):
    report = export_gguf(models["llama"], tmp_path / "m.gguf", outtype="q8_0", split_max_size="1G")
    assert files_in(tmp_path) == ["m.gguf"] and report.shards is None and split_keys(tmp_path / "m.gguf") == {}


@pytest.mark.parametrize("kwargs, words", [
    (dict(base="llama", split_max_size="1M"), "llama.cpp loads a LoRA adapter from one file"),
    (dict(split_max_size="1M", modelfile=True), "Ollama imports a model from one GGUF file"),
])
def test_split_refusals(models, tmp_path, kwargs, words):
    source = models["adapter"] if "base" in kwargs else models["llama"]
    if "base" in kwargs:
        kwargs["base"] = models["llama"]
    with pytest.raises(ValidationError, match=words):
        export_gguf(source, tmp_path / "x.gguf", **kwargs)
    assert files_in(tmp_path) == []


# ----- Ollama Modelfile ---------------------------------------------------------------------------------
#: The instructions of Ollama's Modelfile reference (https://docs.ollama.com/modelfile): not case sensitive.
INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE"}
#: Its "Valid Parameters and Values" table.
PARAMETERS = {"mirostat": int, "mirostat_eta": float, "mirostat_tau": float, "num_ctx": int, "repeat_last_n": int,
              "repeat_penalty": float, "temperature": float, "seed": int, "stop": str, "num_predict": int,
              "top_k": int, "top_p": float, "min_p": float}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, argument)`` pairs, as Ollama's documentation describes the format.

    ``# comment`` lines; ``INSTRUCTION arguments`` otherwise; an argument may be ``"quoted"`` or span lines
    inside ``\"\"\"``; FROM is required; PARAMETER is ``<parameter> <value>`` from the valid-parameters table.
    """
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        instruction, _, arg = line.partition(" ")
        instruction = instruction.upper()
        assert instruction in INSTRUCTIONS, line
        arg = arg.strip()
        if arg.startswith('"""'):
            body = arg[3:]
            while '"""' not in body:
                body += "\n" + lines[i]
                i += 1
            arg = body[: body.index('"""')]
        if instruction == "PARAMETER":
            name, _, value = arg.partition(" ")
            assert name in PARAMETERS, name
            value = value.strip()
            if PARAMETERS[name] is str:
                assert re.fullmatch(r'"[^"\n]*"', value), value  # a quoted string
                value = value[1:-1]
            else:
                PARAMETERS[name](value)
            arg = f"{name} {value}"
        elif arg.startswith('"') and arg.endswith('"') and len(arg) > 1:
            arg = arg[1:-1]
        out.append((instruction, arg))
    assert [k for k, _ in out].count("FROM") == 1, "FROM is required"
    return out


def stops(parsed: list[tuple[str, str]]) -> list[str]:
    return [a.split(" ", 1)[1] for k, a in parsed if k == "PARAMETER" and a.startswith("stop ")]


def test_modelfile_of_a_full_model_names_the_gguf_and_the_eos(models, tmp_path):
    result = run("export-gguf", models["llama"], "--out", tmp_path / "m.gguf", "--modelfile")
    assert result.exit_code == 0, result.stderr
    modelfile = tmp_path / "m.Modelfile"
    assert "ollama create NAME -f " + str(modelfile) in result.stdout
    parsed = parse_modelfile(modelfile.read_text())
    assert dict(parsed)["FROM"] == "./m.gguf" and (modelfile.parent / "m.gguf").is_file()
    assert "ADAPTER" not in dict(parsed) and "TEMPLATE" not in dict(parsed)
    assert stops(parsed) == ["</s>"]  # the tiny tokenizer's eos
    assert "# No TEMPLATE: the chat template is Jinja" in modelfile.read_text()


def test_modelfile_stops_on_the_end_of_turn_tokens(models, tmp_path):
    model = tmp_path / "chat"
    import shutil

    shutil.copytree(models["llama"], model)
    tok = json.loads((model / "tokenizer.json").read_text())
    used = {t["id"] for t in tok["added_tokens"]}
    free = max(tok["model"]["vocab"].values()) + 1
    assert free not in used
    tok["added_tokens"].append({"id": free, "content": "<|im_end|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (model / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    eos_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == "</s>")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos_id, free]}))
    report = export_gguf(model, tmp_path / "out" / "chat.gguf", outtype="f16", modelfile=True)
    text = Path(report.modelfile).read_text()
    eos = json.loads((model / "tokenizer_config.json").read_text())["eos_token"]
    assert stops(parse_modelfile(text)) == [eos if isinstance(eos, str) else eos["content"], "<|im_end|>"]
    assert "Ollama picks its own from the GGUF's tokenizer.chat_template" in text


def test_modelfile_of_a_lora_is_from_the_base_with_the_adapter(models, tmp_path):
    report = export_gguf_many(models["adapter"], tmp_path, base=models["llama"], outtypes=["f16", "q8_0"],
                              modelfile=True)
    for r in report.files:
        parsed = dict(parse_modelfile(Path(r.modelfile).read_text()))
        assert parsed["FROM"] == str(Path(models["llama"]).resolve())
        assert parsed["ADAPTER"] == f"./{Path(r.out).name}" and (tmp_path / parsed["ADAPTER"]).is_file()
    assert files_in(tmp_path) == ["adapter-lora-f16.Modelfile", "adapter-lora-f16.gguf",
                                  "adapter-lora-q8_0.Modelfile", "adapter-lora-q8_0.gguf"]
    hub = export_gguf(models["adapter"], tmp_path / "h.gguf", base=models["llama"], modelfile=True,
                      modelfile_base="hf.co/org/base-GGUF")
    assert dict(parse_modelfile(Path(hub.modelfile).read_text()))["FROM"] == "hf.co/org/base-GGUF"


def test_an_existing_modelfile_is_refused_before_anything_is_written(models, tmp_path):
    (tmp_path / "m.Modelfile").write_text("FROM x\n")
    result = run("export-gguf", models["llama"], "--out", tmp_path / "m.gguf", "--modelfile")
    assert result.exit_code == 1 and "m.Modelfile already exists" in result.stderr
    assert files_in(tmp_path) == ["m.Modelfile"]


def test_the_modelfile_parser_refuses_what_ollama_does_not_document():
    with pytest.raises(AssertionError):
        parse_modelfile("PARAMETER stop </s>\n")  # no FROM, unquoted
    with pytest.raises(AssertionError):
        parse_modelfile("FROM ./m.gguf\nPARAMETER stopp \"x\"\n")
    with pytest.raises(AssertionError):
        parse_modelfile("FROM ./m.gguf\nINCLUDE x\n")
