"""LYNX collection (forced exits, shards, resume), the probe job and its CLI, on a tiny random Llama.

The tiny model (tests/conftest.py) has the default model's tokenizer and 2 layers of width 32; a
random model never answers correctly, so tests that need both labels replace the grader.
"""
from __future__ import annotations

import copy
import json
import zlib

import pytest
import torch
from safetensors.torch import load_file

import probes.collect as collect_mod
from conftest import make_tiny_model
from algos.models import load_causal_lm, load_tokenizer
from probes.collect import (CollectConfig, CollectError, _AnswerClosed, collect_events, evenly_spaced,
                            forced_exit_answers, split_problems)
from probes.cues import CueConfig, cue_preset
from probes.early_exit import NeverExit, lynx_generate
from probes.export import load_probe
from probes.pipeline import LynxJobConfig, LynxJobError, format_summary, run_lynx_job

torch.set_num_threads(1)

RECORDS = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in
           [(12, 30), (7, 5), (40, 2), (3, 3), (25, 17), (9, 91), (60, 6)]]
EXIT = "\nFinal Answer: \\boxed{"


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory) -> str:
    """conftest's tiny Llama with larger random weights (initializer_range 0.3), so that its outputs
    depend on the prefix (with the default 0.02 it repeats one token whatever the input)."""
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-llama-diverse"), initializer_range=0.3,
                               tie_word_embeddings=False))


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    return load_causal_lm(tiny_model_path).eval(), load_tokenizer(tiny_model_path)


def _config(**overrides):
    base = dict(layers=(1, 2), cue_config=CueConfig(("e",), word_boundary=False, region_end=()), exit_string=EXIT,
                batch_size=3, max_new_tokens=16, answer_max_tokens=6, max_events_per_rollout=4, forced_batch_size=5)
    return CollectConfig(**(base | overrides))


def _fake_grader(text, gold, require_boxed=True):
    return zlib.crc32(text.encode()) % 2 == 0


def _shard_tensors(directory):
    return {p.name: load_file(str(p)) for p in sorted(directory.glob("shard-*.safetensors"))}


# --------------------------------------------------------------------------- pieces


def test_split_problems_and_evenly_spaced():
    train, calib = split_problems(10, 0.3, seed=1)
    assert len(calib) == 3 and len(train) == 7 and not set(train) & set(calib)
    assert sorted(train + calib) == list(range(10))
    assert split_problems(10, 0.3, seed=1) == (train, calib)  # seeded
    assert split_problems(10, 0.3, seed=2) != (train, calib)
    with pytest.raises(CollectError, match="calibration_fraction"):
        split_problems(10, 1.0)
    assert evenly_spaced(3, 5) == [0, 1, 2]
    assert evenly_spaced(10, 4) == [0, 3, 6, 9]
    assert evenly_spaced(201, 200) == sorted(set(evenly_spaced(201, 200))) and len(evenly_spaced(201, 200)) == 200
    with pytest.raises(CollectError, match="batch_size"):
        _config(batch_size=0)


def test_answer_closed_stops_each_row_when_its_brace_closes(tiny):
    _, tok = tiny
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("4", "2", "}", ".")]
    crit = _AnswerClosed(tok, open_braces=1, batch=2, start=1)
    seq = torch.tensor([[0, ids[0][0]], [0, ids[2][0]]])
    assert crit(seq, None).tolist() == [False, True]
    seq = torch.cat([seq, torch.tensor([[ids[2][0]], [ids[3][0]]])], dim=1)
    assert crit(seq, None).tolist() == [True, True]  # a finished row stays finished


def test_forced_exits_equal_greedy_generate_from_scratch(tiny):
    """Decoding the forced exits from the rollout's cache (masked slots, batched) gives the answer of
    plain greedy generate on prompt + response[:i] + exit ids, unpadded, one event at a time."""
    model, tok = tiny
    enc = tok(["Hello there", "What is 2 + 2? Think.", "x"], return_tensors="pt", padding=True,
              add_special_tokens=False, padding_side="left")
    g = torch.Generator().manual_seed(0)
    out = lynx_generate(model, tok, enc["input_ids"], enc["attention_mask"], policy=NeverExit((1, 2)),
                        cue_config=CueConfig(("zzz",), region_end=()), max_new_tokens=12, do_sample=True,
                        generator=g, record_features=True, synthetic_event_at=0.7)
    width = enc["input_ids"].shape[1]
    events = [(0, 0), (0, 5), (1, 3), (2, 11), (1, 11), (2, 1), (0, 11)]
    exit_ids = tok(EXIT, add_special_tokens=False)["input_ids"]
    answers = forced_exit_answers(model, tok, out, width, events, exit_ids, answer_max_tokens=7,
                                  stop_at_answer_close=False, batch_size=3)
    assert len({tuple(a) for a in answers}) > 2  # the answers depend on the prefix
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    for (b, i), got in zip(events, answers):
        prompt = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist()
        response = out.sequences[b, width:width + out.stats[b].new_tokens].tolist()
        ref_in = torch.tensor([prompt + response[:i] + exit_ids])
        ref = model.generate(ref_in, attention_mask=torch.ones_like(ref_in), max_new_tokens=7, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, ref_in.shape[1]:].tolist()
        cut = next((k for k, t in enumerate(ref) if t in eos | {tok.pad_token_id}), len(ref))
        assert got == ref[:cut], (b, i)


def test_forced_exits_copy_only_the_rows_they_decode(tiny, monkeypatch):
    """select_cache_rows: the chunk's cache holds just its rows and the rollout's cache is untouched;
    forced exits never deep-copy the whole multi-row cache."""
    import copy as real_copy
    import types

    model, tok = tiny
    enc = tok(["Hello there", "What is 2 + 2?", "x"], return_tensors="pt", padding=True, add_special_tokens=False,
              padding_side="left")
    out = lynx_generate(model, tok, enc["input_ids"], enc["attention_mask"], max_new_tokens=6)
    cache = out.past_key_values
    before = [(layer.keys.data_ptr(), layer.keys.shape) for layer in cache.layers]
    chunk = collect_mod.select_cache_rows(cache, torch.tensor([2, 0]))
    assert [layer.keys.shape[0] for layer in chunk.layers] == [2] * len(cache.layers)
    assert torch.equal(chunk.layers[0].keys[0], cache.layers[0].keys[2])
    assert [(layer.keys.data_ptr(), layer.keys.shape) for layer in cache.layers] == before

    def no_deepcopy(obj, memo=None):
        raise AssertionError("forced exits deep-copied the rollout cache")

    monkeypatch.setattr(collect_mod, "copy", types.SimpleNamespace(copy=real_copy.copy, deepcopy=no_deepcopy))
    width = enc["input_ids"].shape[1]
    answers = forced_exit_answers(model, tok, out, width, [(0, 2), (2, 4)], tok(EXIT, add_special_tokens=False)["input_ids"],
                                  answer_max_tokens=3, batch_size=2)
    assert len(answers) == 2


# --------------------------------------------------------------------------- collection


def test_collect_writes_shards_with_labels_from_the_grader(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(collect_mod, "is_correct", _fake_grader)
    cfg = _config()
    shards = collect_events(model, tok, RECORDS, tmp_path / "ev", cfg, progress=False)
    files = _shard_tensors(tmp_path / "ev")
    assert list(files) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == sorted([*files, "progress.json"])  # no temp files
    assert shards.complete and shards.problems() == list(range(len(RECORDS)))
    events = shards.load()
    assert events.features.shape == (len(events), 2 * model.config.hidden_size) and len(events) > len(RECORDS)
    for shard in files.values():
        for k in range(len(shard["labels"])):
            answer = [t for t in shard["answer_ids"][k].tolist() if t >= 0]
            assert int(shard["labels"][k]) == _fake_grader(EXIT + tok.decode(answer, skip_special_tokens=True), "")
            row = shard["rollout_problem"].tolist().index(int(shard["problem"][k]))
            assert 0 <= int(shard["event_index"][k]) < int(shard["response_len"][row])
        per_rollout = torch.bincount(shard["problem"] - shard["problem"].min())
        assert int(per_rollout.max()) <= cfg.max_events_per_rollout
    assert 0 < events.positive_rate < 1
    # split by problem; the calibration cap keeps an evenly spaced subset of each rollout
    part = shards.load([0, 4], max_per_rollout=2)
    assert set(part.problem.tolist()) <= {0, 4} and int(torch.bincount(part.problem).max()) <= 2
    rollouts = shards.rollouts()
    assert rollouts["problem"].tolist() == list(range(len(RECORDS)))


def test_interrupted_collection_resumes_to_the_same_dataset(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(collect_mod, "is_correct", _fake_grader)
    cfg = _config()
    collect_events(model, tok, RECORDS, tmp_path / "full", cfg, progress=False)

    real, calls = collect_mod._collect_batch, []

    def interrupted(*args, **kwargs):
        calls.append(args[3])  # problem indices
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped while the second batch was running
        return real(*args, **kwargs)

    monkeypatch.setattr(collect_mod, "_collect_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect_events(model, tok, RECORDS, tmp_path / "resumed", cfg, progress=False)
    state = json.loads((tmp_path / "resumed" / "progress.json").read_text())
    assert list(state["shards"]) == ["shard-00000.safetensors"] and not state["complete"]
    assert not list((tmp_path / "resumed").glob(".*"))  # nothing half-written

    def counting(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(collect_mod, "_collect_batch", counting)
    calls.clear()
    shards = collect_events(model, tok, RECORDS, tmp_path / "resumed", cfg, progress=False)
    assert calls == [[3, 4, 5], [6]]  # the first batch was not redone
    assert shards.complete
    full, resumed = _shard_tensors(tmp_path / "full"), _shard_tensors(tmp_path / "resumed")
    assert list(full) == list(resumed)
    for name in full:
        assert full[name].keys() == resumed[name].keys()
        for key in full[name]:
            assert torch.equal(full[name][key], resumed[name][key]), (name, key)
    calls.clear()
    collect_events(model, tok, RECORDS, tmp_path / "resumed", cfg, progress=False)  # all done: nothing runs
    assert calls == []


def test_collection_refuses_other_settings_data_or_model(tiny, tmp_path):
    model, tok = tiny
    cfg = _config(max_new_tokens=4)
    collect_events(model, tok, RECORDS[:2], tmp_path / "ev", cfg, progress=False)
    with pytest.raises(CollectError, match="other settings .max_new_tokens: 4 there, 5 now") as err:
        collect_events(model, tok, RECORDS[:2], tmp_path / "ev", _config(max_new_tokens=5), progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(CollectError, match="other problems"):
        collect_events(model, tok, RECORDS[1:3], tmp_path / "ev", cfg, progress=False)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    with pytest.raises(CollectError, match="a different model"):
        collect_events(other, tok, RECORDS[:2], tmp_path / "ev", cfg, progress=False)
    with pytest.raises(CollectError, match="a different model .dtype"):  # features depend on the dtype
        collect_events(copy.deepcopy(model).to(torch.bfloat16), tok, RECORDS[:2], tmp_path / "ev", cfg, progress=False)
    progress = json.loads((tmp_path / "ev" / "progress.json").read_text())
    (tmp_path / "ev" / "progress.json").write_text(json.dumps(progress | {"version": 1}))
    with pytest.raises(CollectError, match="another repro-rl version .format v1.*another data directory"):
        collect_events(model, tok, RECORDS[:2], tmp_path / "ev", cfg, progress=False)
    (tmp_path / "not-events").mkdir()
    (tmp_path / "not-events" / "x.txt").write_text("hi")
    with pytest.raises(CollectError, match="not a LYNX event collection"):
        collect_events(model, tok, RECORDS[:2], tmp_path / "not-events", cfg, progress=False)
    with pytest.raises(CollectError, match="out of range"):
        collect_events(model, tok, RECORDS[:2], tmp_path / "ev2", _config(layers=(3,)), progress=False)
    assert not (tmp_path / "ev2").exists()


# --------------------------------------------------------------------------- the job and its CLI


def _job(tmp_path, model_path, **overrides):
    base = dict(model_name_or_path=model_path, dataset="arithmetic", num_problems=16, num_eval_problems=4,
                output_dir=str(tmp_path / "lynx"), max_new_tokens=10, answer_max_tokens=4, batch_size=8,
                cue_preset="linebreak", eval_confidences=(0.6, 0.8), confidence=0.7, progress=False)
    return LynxJobConfig(**(base | overrides))


def test_job_collects_trains_calibrates_exports_and_evaluates(tiny_model_path, tmp_path, monkeypatch):
    # label by the problem's gold answer: both labels occur, and disjoint problems share no label noise
    monkeypatch.setattr(collect_mod, "is_correct", lambda text, gold, require_boxed=True: int(gold) % 2 == 0)
    summary = run_lynx_job(_job(tmp_path, tiny_model_path))
    model = load_causal_lm(tiny_model_path)
    bundle = load_probe(tmp_path / "lynx", model=model)
    assert bundle.layers == (1, 2) and bundle.default_confidence == 0.7
    assert bundle.cue_config == cue_preset("linebreak", thinking=False) and bundle.exit_string == EXIT
    assert bundle.calibration.sizes == (summary["calibration"]["n_safe"], summary["calibration"]["n_continue"])
    on_disk = json.loads((tmp_path / "lynx" / "summary.json").read_text())
    c = on_disk["collection"]
    assert c["train"]["problems"] + c["calibration"]["problems"] == 16 and c["held_out"]["problems"] == 4
    assert c["train"]["events"] > 0 and c["calibration"]["events"] > 0
    assert [r["confidence"] for r in on_disk["calibration"]["rules"]] == [0.6, 0.7, 0.8]
    ev = on_disk["evaluation"]
    assert [r["arm"] for r in ev["decoding"]] == ["no exit", "c=0.6", "c=0.8"]
    assert all(r["problems"] == 4 and 0 <= r["accuracy"] <= 1 and r["mean_new_tokens"] > 0 for r in ev["decoding"])
    assert [r["delta"] for r in ev["premature_exits"]] == pytest.approx([0.4, 0.3, 0.2])
    assert (tmp_path / "lynx-events" / "progress.json").is_file()


def test_no_regret_labels_mark_safe_the_events_of_wrong_rollouts():
    from probes.collect import EventSet

    events = EventSet(features=torch.zeros(5, 2), labels=torch.tensor([0, 1, 0, 0, 1], dtype=torch.int8),
                      problem=torch.tensor([3, 3, 4, 5, 5]), event_index=torch.arange(5),
                      synthetic=torch.zeros(5, dtype=torch.bool))
    correct = {3: True, 4: False, 5: True}
    # forced labels kept; problem 4's rollout ends wrong, so exiting there loses nothing
    assert events.relabelled("forced", correct).labels.tolist() == [0, 1, 0, 0, 1]
    relabelled = events.relabelled("no_regret", correct)
    assert relabelled.labels.tolist() == [0, 1, 1, 0, 1] and relabelled.labels.dtype == torch.int8
    assert events.labels.tolist() == [0, 1, 0, 0, 1]  # the original is unchanged
    with pytest.raises(CollectError, match="exit label rule"):
        events.relabelled("oracle", correct)


def test_job_with_no_regret_labels_reports_both_premature_rates(tiny_model_path, tmp_path, monkeypatch):
    from probes.pipeline import load_problems

    # forced exits are right for even gold answers; a rollout's own answer is right unless gold % 3 == 0
    def grader(text, gold, require_boxed=True):
        return int(gold) % 2 == 0 if text.startswith(EXIT) else int(gold) % 3 != 0

    monkeypatch.setattr(collect_mod, "is_correct", grader)
    forced = run_lynx_job(_job(tmp_path / "a", tiny_model_path))
    cfg = _job(tmp_path / "b", tiny_model_path, exit_label="no_regret", eval_temperature=0.7)
    regret = run_lynx_job(cfg)
    pool, held = load_problems(cfg)
    assert forced["collection"]["exit_label"] == "forced" and regret["collection"]["exit_label"] == "no_regret"
    assert regret["collection"]["rollout_accuracy"] == pytest.approx(sum(int(r["answer"]) % 3 != 0 for r in pool) / 16)
    # events of odd multiples of 3 turn safe: fewer continue events, the same events in all
    f, r = forced["collection"]["held_out"], regret["collection"]["held_out"]
    wrong_rollouts = sum(int(x["answer"]) % 6 == 3 for x in held)
    assert f["events"] == r["events"] and (r["positive_rate"] > f["positive_rate"] if wrong_rollouts else True)
    assert forced["evaluation"]["premature_exits_forced_label"] is None
    sampled = regret["evaluation"]["decoding"]  # held-out decoding sampled at T = 0.7
    assert [r["arm"] for r in sampled] == ["no exit", "c=0.6", "c=0.8"] and all(r["mean_new_tokens"] > 0 for r in sampled)
    assert "sampled at T = 0.7" in format_summary(regret)
    judged = regret["evaluation"]["premature_exits_forced_label"]
    assert [x["continue_events"] for x in judged] == [x["continue_events"] for x in forced["evaluation"]["premature_exits"]]
    assert all(a["continue_events"] <= b["continue_events"] for a, b in zip(regret["evaluation"]["premature_exits"], judged))
    with pytest.raises(LynxJobError, match="--exit_label"):
        run_lynx_job(_job(tmp_path / "c", tiny_model_path, exit_label="oracle"))


def test_job_stops_with_one_line_when_a_label_is_missing(tiny_model_path, tmp_path):
    # a random model never answers correctly: no "safe" event; nothing is exported
    with pytest.raises(LynxJobError, match="at least 2 events of each label") as err:
        run_lynx_job(_job(tmp_path, tiny_model_path, num_eval_problems=0, num_problems=6))
    assert "\n" not in str(err.value) and not (tmp_path / "lynx").exists()


def test_cli_help_and_one_line_errors(tmp_path, capsys):
    import train.lynx_probe as cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--confidence", "--cue_preset", "--num_eval_problems", "--data_dir",
                 "--exit_label", "--eval_temperature", "--eval_top_p", "--eval_samples"):
        assert flag in help_text
    out = tmp_path / "lynx"
    for argv, needle in [(["--confidence", "1.5"], "--confidence must be in (0, 1)"),
                         (["--num_problems", "2"], "--num_problems must be >= 4"),
                         (["--eval_temperature", "-0.5"], "--eval_temperature must be >= 0"),
                         (["--eval_temperature", "0.6", "--eval_top_p", "0"], "--eval_top_p in (0, 1]"),
                         (["--exit_label", "oracle"], "--exit_label"),
                         (["--eval_confidences", "0.9,x"], "comma-separated numbers"),
                         (["--data_dir", str(out / "events")], "must not contain each other"),
                         (["--dataset", str(tmp_path / "missing.jsonl")], "does not exist")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv + ["--output_dir", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists() and not (tmp_path / "lynx-events").exists()


def test_job_decodes_each_held_out_problem_several_times_with_paired_seeds(tiny_model_path, tmp_path, monkeypatch):
    import probes.evaluate as evaluate_mod
    from probes.evaluate import sample_seed

    monkeypatch.setattr(collect_mod, "is_correct", lambda text, gold, require_boxed=True: int(gold) % 2 == 0)
    monkeypatch.setattr(evaluate_mod, "is_correct", lambda text, gold, require_boxed=True: _fake_grader(text, gold))
    seeds, real_generate = [], evaluate_mod.lynx_generate

    def recording_generate(*args, generator=None, **kwargs):
        seeds.append(generator.initial_seed())
        return real_generate(*args, generator=generator, **kwargs)

    monkeypatch.setattr(evaluate_mod, "lynx_generate", recording_generate)
    cfg = _job(tmp_path, tiny_model_path, eval_temperature=1.0, eval_samples=2, eval_batch_size=3, seed=5)
    summary = run_lynx_job(cfg)
    rows = summary["evaluation"]["decoding"]
    # 4 held-out problems in batches of 3 (starts 0 and 3), two passes, the same seeds in each of the 3 arms;
    # pass 0 keeps the single-pass seeds
    per_arm = [5 * 1_000_003, 5 * 1_000_003 + 3, sample_seed(5, 0, 1), sample_seed(5, 3, 1)]
    assert per_arm[1] == sample_seed(5, 3, 0) and len(set(per_arm)) == 4
    assert seeds == per_arm * 3
    for r in rows:
        assert r["problems"] == 4 and r["samples"] == 2
    # a calibration that exits at the first cue (q_continue = 0, q_safe = 1) and a cue most rollouts meet
    from dataclasses import replace

    from probes.conformal import ConformalCalibration
    from probes.pipeline import load_problems

    model, tok = load_causal_lm(tiny_model_path).eval(), load_tokenizer(tiny_model_path)
    bundle = replace(load_probe(tmp_path / "lynx", model=model),
                     calibration=ConformalCalibration([1.0] * 50, [0.0] * 50), cue_config=_config().cue_config)
    _, held = load_problems(cfg)
    rows = evaluate_mod.evaluate_decoding(model, tok, bundle, held, (0.9,), prompt_template=cfg.prompt_template,
                                          max_new_tokens=10, batch_size=3, temperature=1.0, top_p=0.95, seed=5,
                                          samples=3, progress=False)
    exit_arm = rows[1]
    assert exit_arm["samples"] == 3 and exit_arm["exit_rate"] > 0
    # an exit arm follows the no-exit trajectory wherever it does not exit: only exits change a grade
    assert exit_arm["accuracy_change"] == pytest.approx((exit_arm["gained_by_exit"] - exit_arm["lost_by_exit"]) / 12)
    assert exit_arm["accuracy_change"] == pytest.approx(exit_arm["accuracy"] - rows[0]["accuracy"])
    lo, hi = exit_arm["accuracy_change_ci95"]
    assert lo <= exit_arm["accuracy_change"] <= hi
    with pytest.raises(ValueError, match="samples"):
        evaluate_mod.evaluate_decoding(model, tok, bundle, held, (0.9,), prompt_template=cfg.prompt_template,
                                       max_new_tokens=10, samples=2, progress=False)
    text = format_summary(summary)
    assert "2 samples per problem" in text and "points [95% CI" in text and "rollouts by exiting" in text
    with pytest.raises(LynxJobError, match="--eval_samples"):
        run_lynx_job(_job(tmp_path / "greedy", tiny_model_path, eval_samples=2))
