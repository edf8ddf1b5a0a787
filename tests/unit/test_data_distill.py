"""The ``distill`` data kind: a teacher's answers to prompts, generated resumably and fingerprinted.

Outside references: transformers' own ``generate()`` of the same base (greedy), the tokenizer's chat
template (the prompt the teacher saw), and an uninterrupted generation (what a killed one resumes to).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemodiff_train.assets import embedded_data_file, embedded_model_dir
from nemodiff_train.data.distill import DistillError, DistillSettings, generate_distill_set
from nemodiff_train.data.distill_teacher import base_generation_config, base_teacher_identity, load_base_teacher
from nemodiff_train.data.sources import SourceSpec
from nemodiff_train.models.stop_tokens import stop_token_ids
from nemodiff_train.data.tokenizer import load_tokenizer
from tests.helpers.tiny_run import make_model_dir

pytestmark = pytest.mark.unit


def _never(*_a):
    raise AssertionError("the teacher was needed although nothing was left to generate")


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def embedded():
    """The embedded base (it answers arithmetic problems and ends its turn with <|im_end|>)."""
    tok = load_tokenizer(str(embedded_model_dir()))
    return load_base_teacher("embedded"), tok, stop_token_ids(tok, base_generation_config("embedded"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Qwen3 + the tiny ChatML tokenizer, saved as a model directory."""
    d = make_model_dir(tmp_path_factory.mktemp("distill_model"))
    return d, load_base_teacher(str(d)), load_tokenizer(str(d))


def _prompt_ids(tok, messages):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"])


def test_the_teachers_stop_set_is_eos_then_the_chat_terminator(embedded):
    _, tok, _ = embedded
    assert stop_token_ids(tok, base_generation_config("embedded")) == (0, 2)  # <|endoftext|>, <|im_end|>


def test_greedy_answers_equal_transformers_generate(embedded, tmp_path):
    model, tok, stops = embedded
    src = SourceSpec(str(embedded_data_file("arithmetic_sft_train.jsonl.gz")))
    s = generate_distill_set(src, model, str(embedded_model_dir()), stops,
                             DistillSettings(max_new_tokens=104, batch_size=2, max_prompts=3), tmp_path / "set",
                             teacher_identity=base_teacher_identity("embedded"), log=None)
    rows = [json.loads(line) for line in s.files[0].read_text().splitlines()]
    assert s.meta["sources"][0]["prompts"] == 3 and len(rows) == 3  # two chunks (2 + 1), every answer ended
    for row in rows:
        ids = _prompt_ids(tok, row["messages"][:-1])
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=104, do_sample=False, eos_token_id=list(stops), pad_token_id=0)
        assert row["response_tokens"] + [row["stop_token"]] == ref[0, len(ids):].tolist()
        assert row["stop_token"] in stops and not set(row["response_tokens"]) & set(stops)
        assert row["messages"][-1] == {"role": "assistant", "content": tok.decode(row["response_tokens"])}
    assert "#### " in rows[0]["messages"][-1]["content"]


def test_answers_cut_by_max_new_tokens_are_left_out_and_counted(embedded, tmp_path):
    model, tok, stops = embedded
    src = SourceSpec(str(embedded_data_file("arithmetic_sft_train.jsonl.gz")))
    s = generate_distill_set(src, model, str(embedded_model_dir()), stops,
                             DistillSettings(max_new_tokens=6, batch_size=4, max_prompts=4), tmp_path / "set",
                             teacher_identity={"kind": "test"}, log=None)
    m = s.meta["sources"][0]
    assert (m["prompts"], m["kept"], m["cut_by_max_new_tokens"]) == (4, 0, 4)
    assert m["cut_examples"][0].endswith("arithmetic_sft_train.jsonl.gz:1")
    assert s.files[0].read_text() == ""


def test_any_stop_id_ends_the_answer_where_it_first_appears(tiny, tmp_path):
    d, model, tok = tiny
    messages = [{"role": "user", "content": "hello world"}]
    ids = _prompt_ids(tok, messages)
    free = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    stop = free[4]
    src = SourceSpec(str(_write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world"}])))
    s = generate_distill_set(src, model, str(d), (stop,), DistillSettings(prompt_field="prompt", max_new_tokens=12),
                             tmp_path / "set", teacher_identity={"kind": "test"}, log=None)
    row = json.loads(s.files[0].read_text())
    assert row["response_tokens"] == free[:free.index(stop)] and row["stop_token"] == stop


def test_prompt_column_and_chat_turn_sources(tiny, tmp_path):
    d, model, tok = tiny
    stop_all = tuple(range(len(tok)))  # every token ends the answer: one token per answer, fast
    col = _write_jsonl(tmp_path / "col.jsonl", [{"prompt": "what is data"}, {"prompt": "print the key"}])
    chat = _write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                      {"role": "assistant", "content": "one"}, {"role": "user", "content": "second"},
                      {"role": "assistant", "content": "the data set's own answer"}]},
        {"messages": [{"role": "assistant", "content": "no user turn"}]},
        {"messages": [{"role": "user", "content": "contains <|im_end|> marker"}]},
        "{not json",
        {"messages": [{"role": "user", "content": "last"}]},
    ])
    settings = DistillSettings(max_new_tokens=4)
    a = generate_distill_set(SourceSpec(str(col)), model, str(d), stop_all, DistillSettings(prompt_field="prompt"),
                             tmp_path / "a", teacher_identity={"kind": "test"}, log=None)
    b = generate_distill_set(SourceSpec(str(chat)), model, str(d), stop_all, settings, tmp_path / "b",
                             teacher_identity={"kind": "test"}, log=None)
    col_rows = [json.loads(x) for x in a.files[0].read_text().splitlines()]
    assert [r["messages"][:-1] for r in col_rows] == [[{"role": "user", "content": "what is data"}],
                                                      [{"role": "user", "content": "print the key"}]]
    chat_rows = [json.loads(x) for x in b.files[0].read_text().splitlines()]
    assert [r["messages"][:-1] for r in chat_rows] == [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
         {"role": "assistant", "content": "one"}, {"role": "user", "content": "second"}],
        [{"role": "user", "content": "last"}]]
    assert [r["where"].rsplit(":", 1)[1] for r in chat_rows] == ["1", "5"]
    assert b.meta["sources"][0]["skipped"] == {"bad-json": 1, "bad-order": 1, "special-token-in-content": 1}
    # the answer the teacher was given the prompt for: its first token follows the rendered prompt
    ids = _prompt_ids(tok, chat_rows[0]["messages"][:-1])
    first = model(torch.tensor([ids])).logits[0, -1].argmax().item()
    assert chat_rows[0]["response_tokens"] == [] and chat_rows[0]["stop_token"] == first


def test_a_row_without_the_field_is_an_error_naming_file_and_line(tiny, tmp_path):
    d, model, _ = tiny
    f = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"question": "wrong column"}])
    with pytest.raises(DistillError, match=rf"{f}:2: the row has no 'prompt' field"):
        generate_distill_set(SourceSpec(str(f)), model, str(d), (0,), DistillSettings(prompt_field="prompt"),
                             tmp_path / "set", teacher_identity={"kind": "test"}, log=None)
    with pytest.raises(DistillError, match=rf"{f}:1: the row has no 'messages' field"):
        generate_distill_set(SourceSpec(str(f)), model, str(d), (0,), DistillSettings(), tmp_path / "set2",
                             teacher_identity={"kind": "test"}, log=None)


@pytest.mark.parametrize("kw, match", [({"teacher": "teacher"}, "teacher 'teacher' is not one of"),
                                       ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                       ({"batch_size": 0}, "batch_size"), ({"max_prompts": 0}, "max_prompts")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(DistillError, match=match):
        DistillSettings(**kw)


def test_a_complete_set_is_reused_and_another_spec_refused(tiny, tmp_path):
    d, model, _ = tiny
    f = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"item {i}"} for i in range(3)])

    def generate(teacher, stops=(0, 3), identity=None, **settings):
        return generate_distill_set(SourceSpec(str(f)), teacher, str(d), stops,
                                    DistillSettings(**{"prompt_field": "prompt", "max_new_tokens": 3, **settings}),
                                    tmp_path / "set", teacher_identity=identity or {"kind": "base", "sha": "a"}, log=None)

    first = generate(model)
    again = generate(_never)  # complete and unchanged: the teacher is not even built
    assert again.fingerprint == first.fingerprint and again.meta == first.meta
    for change in [dict(temperature=0.7), dict(max_new_tokens=4), dict(batch_size=2), dict(stops=(0,)),
                   dict(identity={"kind": "base", "sha": "b"})]:
        with pytest.raises(DistillError, match="generated from a different spec"):
            generate(_never, **change)
    _write_jsonl(f, [{"prompt": f"item {i}"} for i in range(4)])  # the prompts changed in place
    with pytest.raises(DistillError, match="generated from a different spec"):
        generate(_never)


_DISTILL_STAGE = ["recipe=tiny_cpu", "stages.0.kind=distill", "stages.0.data.kind=distill"]


def test_a_distill_stage_composes_with_its_defaults():
    from nemodiff_train.config import compose

    d = compose(_DISTILL_STAGE).stages[0].data.distill
    assert (d.teacher, d.prompt_field, d.temperature, d.device) == ("base", None, 0.0, "cpu")


@pytest.mark.parametrize("overrides, key", [
    (["stages.0.data.distill.teacher=teacher"], "stages.0.data.distill.teacher"),
    (["stages.0.data.distill.temperature=-0.5"], "stages.0.data.distill.temperature"),
    (["stages.0.data.distill.device=tpu"], "stages.0.data.distill.device"),
    (["stages.0.data.distill.teacher=current", "engine=megatron"], "stages.0.data.distill.teacher"),
    (["+stages.0.data.distill.teacher_path=x"], "teacher_path"),
    (["stages.0.data.kind=sft"], "stages.0.data.kind"),
])
def test_bad_distill_config_names_the_key(overrides, key):
    from nemodiff_train.config import ConfigError, compose

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(_DISTILL_STAGE + overrides)


def test_teacher_current_without_a_model_says_who_must_pass_it(tmp_path):
    from nemodiff_train.config import compose
    from nemodiff_train.data.stage import prepare_stage

    cfg = compose(_DISTILL_STAGE + ["stages.0.data.distill.teacher=current",
                                    "stages.0.data.sources=[embedded:arithmetic_sft_val.jsonl.gz]"])
    with pytest.raises(DistillError, match="teacher=current: the current model answers"):
        prepare_stage(cfg, 0, tmp_path, tokenizer=embedded_model_dir())


def test_teacher_current_answers_in_ar_mode_restores_training_mode_and_is_reused(embedded, tmp_path):
    """The trainer's call: prepare_stage(..., teacher_model=dlm). The DLM's AR mode (mask banned) is the
    base here (nothing trained yet), so its greedy answers equal the base teacher's."""
    from nemodiff_train.config import compose
    from nemodiff_train.data.stage import prepare_stage
    from nemodiff_train.models.hf import load_dlm

    base, tok, _ = embedded
    f = _write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Mia has 3 bags with 4 apples in each. How many apples does Mia have?"}]},
        {"messages": [{"role": "user", "content": "Tom has 9 pens and gives away 2. How many pens does Tom have now?"}]}])
    cfg = compose(_DISTILL_STAGE + ["stages.0.data.distill.teacher=current", f"stages.0.data.sources=[{f}]",
                                    "stages.0.data.val_sources=[]", "stages.0.data.val_fraction=0",
                                    "stages.0.data.seq_len=192", "stages.0.data.max_documents=null",
                                    "stages.0.data.distill.max_new_tokens=104"])
    dlm = load_dlm(embedded_model_dir(), mask_token="<|mask|>")
    dlm.hf.train()
    out = prepare_stage(cfg, 0, tmp_path / "run", tokenizer=embedded_model_dir(), teacher_model=dlm)
    assert dlm.hf.training
    meta = json.loads((out.parent / f"{out.name}.distill" / "meta.json").read_text())
    assert meta["teacher"] == {"kind": "current", "model_path": "embedded", "adapter": "none", "run_seed": 0,
                               "stage_index": 0, "start_step": 0}
    rows = [json.loads(x) for x in (out.parent / f"{out.name}.distill" / "rows" / "src0.jsonl").read_text().splitlines()]
    for row in rows:
        ids = _prompt_ids(tok, row["messages"][:-1])
        ref = base.generate(torch.tensor([ids]), max_new_tokens=104, do_sample=False, eos_token_id=[0, 2], pad_token_id=0)
        assert row["response_tokens"] + [row["stop_token"]] == ref[0, len(ids):].tolist()
    # a resumed run calls again with its (since trained) model: the set and the prepared data are reused
    with torch.no_grad():
        dlm.hf.get_input_embeddings().weight.add_(1.0)
    assert prepare_stage(cfg, 0, tmp_path / "run", tokenizer=embedded_model_dir(), teacher_model=dlm) == out
    assert [json.loads(x) for x in (out.parent / f"{out.name}.distill" / "rows" / "src0.jsonl").read_text().splitlines()] == rows
