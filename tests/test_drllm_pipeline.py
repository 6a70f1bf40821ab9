"""Dr.LLM pipeline: trace collection (incremental, resumable), teacher-forced features, router
training and metrics, held-out evaluation, and the train/drllm_router.py entry point."""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from routers.evaluate import evaluate_routing  # noqa: E402
from routers.losses import class_weights_from_counts, label_counts  # noqa: E402
from routers.mcts import MCTSConfig  # noqa: E402
from routers.path_eval import encode_left_padded  # noqa: E402
from routers.paths import actions_to_path  # noqa: E402
from routers.routed_model import RoutedModel  # noqa: E402
from routers.router import PathRouter, window_pool  # noqa: E402
from routers.traces import TraceError, collect_traces, read_traces, summarize  # noqa: E402
from routers.training import (RouterTrainConfig, RoutingData, cosine_with_warmup, routing_metrics,  # noqa: E402
                              split_indices, teacher_forced_features, train_router)
from script_loader import load_script  # noqa: E402

torch.set_num_threads(1)
L = 4
PAD = 0


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=PAD, eos_token_id=1, bos_token_id=2)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.config._name_or_path = f"tiny-{seed}"
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, 1
    return model


class CharTokenizer:
    """Stand-in tokenizer: character c -> token 3 + ord(c) % 90; token t >= 3 decodes to a digit."""

    pad_token_id = PAD

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = torch.tensor([[3 + (ord(c) % 90) for c in text]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(str(int(t) % 10) for t in row if int(t) >= 3) for row in rows]


class StubEvaluator:
    """Reward without generation: the gold answer names the blocks that must stay on the path
    ('03': blocks 0 and 3), or 'repeat' (right iff some block runs twice; the base is wrong), or
    'never'. Counts every evaluator built (= examples searched)."""

    built = 0

    def __init__(self, routed, tokenizer, prompt, gold, max_new_tokens, require_boxed, **evaluator_options):
        type(self).built += 1
        self.gold, self.last_completions = gold, {}

    def __call__(self, path):
        self.last_completions[tuple(path)] = f"path {list(path)}"
        if self.gold == "never":
            return 0.0
        if self.gold == "repeat":
            return float(len(set(path)) < len(path))
        return float({int(c) for c in self.gold} <= set(path))


@pytest.fixture(scope="module")
def routed():
    return RoutedModel(tiny_model())


def records(golds):
    return [{"question": f"q{i}", "answer": g} for i, g in enumerate(golds)]


# ---------------------------------------------------------------- traces


def test_traces_written_incrementally_resumed_and_checked(routed, tmp_path):
    path = tmp_path / "traces.jsonl"
    mcts = MCTSConfig(simulations=20, seed=0)
    golds = ["03", "0123", "repeat", "never", "3"]
    recs, prompts = records(golds), [f"prompt {i}" for i in range(5)]
    StubEvaluator.built = 0
    first = collect_traces(routed, CharTokenizer(), recs[:3], prompts[:3], path, {"dataset": "stub"}, mcts,
                           progress=False, make_evaluator=StubEvaluator)
    assert StubEvaluator.built == 3
    header, on_disk = read_traces(path)
    assert header["mcts"]["simulations"] == 20 and header["base_model"]["name"] == "tiny-0"
    assert on_disk == first and [t["index"] for t in first] == [0, 1, 2]
    t0, t1, t2 = first
    assert t0["kept"] and t0["base_correct"] and t0["stop_reason"] == "short_correct_path"
    assert t0["layers"] <= L - 2 and {0, 3} <= set(t0["target"]) and t0["labels"] == [1, 0, 0, 1]
    assert t1["target"] == [0, 1, 2, 3] and t1["layers_saved"] == 0 and t1["labels"] == [1] * L
    assert t2["fixed_base_error"] and t2["stop_reason"] == "fixed_base_error" and 2 in t2["labels"]

    # a crash mid-line leaves a torn tail: it is dropped, the example searched again
    with open(path, "a") as f:
        f.write('{"index": 3, "quest')
    StubEvaluator.built = 0
    allt = collect_traces(routed, CharTokenizer(), recs, prompts, path, {"dataset": "stub"}, mcts,
                          progress=False, make_evaluator=StubEvaluator)
    assert StubEvaluator.built == 2  # only examples 3 and 4: the first three were resumed
    assert allt[:3] == first and not allt[3]["kept"] and allt[3]["target"] is None
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line) for line in lines)
    s = summarize(allt, L)
    assert (s["searched"], s["kept"], s["dropped"], s["fixed_base_errors"], s["base_correct"]) == (5, 4, 1, 1, 3)
    StubEvaluator.built = 0
    collect_traces(routed, CharTokenizer(), recs, prompts, path, {"dataset": "stub"}, mcts, progress=False,
                   make_evaluator=StubEvaluator)
    assert StubEvaluator.built == 0  # everything done: nothing searched, a dropped example included

    before = path.read_text()
    other = tiny_model(seed=1)
    other.config._name_or_path = "tiny-0"  # same name, other weights: refused by the weights fingerprint
    cases = [
        (dict(routed=routed, settings={"dataset": "stub"}, mcts=MCTSConfig(simulations=30, seed=0)), "mcts.simulations"),
        (dict(routed=routed, settings={"dataset": "other"}, mcts=mcts), "settings.dataset"),
        (dict(routed=RoutedModel(other), settings={"dataset": "stub"}, mcts=mcts), "base_model.weights_fingerprint"),
    ]
    for kwargs, key in cases:
        with pytest.raises(TraceError, match=key) as err:
            collect_traces(kwargs["routed"], CharTokenizer(), recs, prompts, path, kwargs["settings"],
                           kwargs["mcts"], progress=False, make_evaluator=StubEvaluator)
        assert "\n" not in str(err.value)
    changed = records(golds)
    changed[1]["question"] = "another"
    with pytest.raises(TraceError, match="another question at example 1"):
        collect_traces(routed, CharTokenizer(), changed, prompts, path, {"dataset": "stub"}, mcts,
                       progress=False, make_evaluator=StubEvaluator)
    assert path.read_text() == before  # refused runs leave the file untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traces.jsonl"]  # no temp files left
    old = path.with_name("old.jsonl")  # a file of the previous format (its fingerprint meant other things)
    old.write_text(before.replace('"version": 2', '"version": 1', 1))
    with pytest.raises(TraceError, match="another repro-rl version .trace format v1.*another --output_dir"):
        collect_traces(routed, CharTokenizer(), recs, prompts, old, {"dataset": "stub"}, mcts, progress=False,
                       make_evaluator=StubEvaluator)


# ---------------------------------------------------------------- teacher forcing


def test_teacher_forced_features_follow_each_target_path(routed):
    tok = CharTokenizer()
    prompts = ["what is 2+2", "hello", "a longer prompt of twenty"]
    labels = [[1, 2, 0, 1], [0, 1, 1, 2], [1, 1, 1, 1]]
    data = teacher_forced_features(routed, tok, prompts, labels, num_windows=8, batch_size=3)
    assert data.pooled.shape == (3, L, 8, 32) and data.valid.shape == (3, L, 8)
    assert data.labels.tolist() == labels
    with torch.no_grad():
        for b, (prompt, row) in enumerate(zip(prompts, labels)):
            ids, mask = encode_left_padded(tok, [prompt])
            for layer in range(L):
                before = row[:layer] + [0] * (L - layer)  # blocks < layer as labelled, the rest skipped
                hidden = routed(ids, mask, actions=actions_to_path(before), output_hidden_states=True).hidden_states
                want, valid = window_pool(hidden, mask, 8)
                assert torch.equal(data.valid[b, layer], valid[0])
                assert torch.allclose(data.pooled[b, layer][valid[0]], want[0][valid[0]], atol=1e-5), (b, layer)
    alone = teacher_forced_features(routed, tok, prompts[1:2], labels[1:2], num_windows=8)
    assert torch.allclose(alone.pooled[0], data.pooled[1], atol=1e-5)  # batching/padding changes nothing


# ---------------------------------------------------------------- training and metrics


def synthetic_data(n: int, seed: int, layers: int = 3, dim: int = 8) -> RoutingData:
    """Label of block l = 0 if feature l of the window means is < -0.5, 2 if > 0.5, else 1."""
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(n, layers, 1, dim, generator=g).expand(n, layers, 4, dim).contiguous()
    signal = pooled[:, torch.arange(layers), 0, torch.arange(layers)]
    labels = torch.ones(n, layers, dtype=torch.long)
    labels[signal < -0.5], labels[signal > 0.5] = 0, 2
    return RoutingData(pooled, torch.ones(n, layers, 4, dtype=torch.bool), labels)


def test_router_training_learns_and_uses_weights_from_counts():
    train, val = synthetic_data(256, 0), synthetic_data(128, 1)
    torch.manual_seed(0)
    router = PathRouter(3, 8, router_hidden=32, num_windows=4)
    from routers.training import predict
    before = routing_metrics(predict(router, val), val.labels)
    metrics = train_router(router, train, val, RouterTrainConfig(epochs=30, batch_size=32, learning_rate=1e-2))
    counts = label_counts(train.labels)
    assert metrics["label_counts"] == counts.tolist()
    assert metrics["class_weights"] == pytest.approx(class_weights_from_counts(counts).tolist(), rel=1e-5)
    assert metrics["epoch_losses"][-1] < 0.5 * metrics["epoch_losses"][0]
    assert metrics["val"]["layer_accuracy"] > 0.9 > before["layer_accuracy"]
    assert metrics["val"]["macro_f1"] > 0.85 and len(metrics["val"]["per_layer_accuracy"]) == 3


def test_cosine_schedule_with_warmup_hand_values():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = cosine_with_warmup(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [0.5e-3, 1e-3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(want)


def test_routing_metrics_hand_computed():
    labels = torch.tensor([[1, 1, 0], [1, 2, 1]])
    pred = torch.tensor([[1, 0, 0], [1, 1, 1]])
    m = routing_metrics(pred, labels)
    assert m["layer_accuracy"] == pytest.approx(4 / 6)
    assert m["per_layer_accuracy"] == [1.0, 0.0, 1.0]
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 3 fp 1 fn 1 -> 6/8; class 2: tp 0 fn 1 -> 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 6 / 8 + 0.0) / 3)
    assert m["f1_per_class"] == {"0": pytest.approx(2 / 3, abs=1e-4), "1": 0.75, "2": 0.0}
    assert m["path_exact"] == 0.0 and m["always_execute_accuracy"] == pytest.approx(4 / 6)
    assert m["mean_layers_predicted"] == pytest.approx(2.0) and m["mean_layers_target"] == pytest.approx(3.0)


def test_split_indices_disjoint_and_seeded():
    train, val = split_indices(10, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert split_indices(10, 0.2, seed=3) == (train, val)
    assert split_indices(3, 0.1)[1] and split_indices(1, 0.5) == ([0], [])
    with pytest.raises(ValueError):
        split_indices(5, 1.0)


# ---------------------------------------------------------------- held-out evaluation


def test_evaluate_routing_knob_extremes(routed):
    tok = CharTokenizer()
    prompts, answers = ["what is 1+1", "2+3", "seven"], ["2", "5", "7"]
    router = PathRouter(L, 32)
    always_execute = evaluate_routing(routed, tok, router, prompts, answers, max_new_tokens=3, require_boxed=False,
                                      batch_size=2, p=0.5)
    assert always_execute["accuracy_routed"] == always_execute["accuracy_unrouted"]
    assert always_execute["mean_layers_routed"] == L and always_execute["fixed"] == always_execute["broken"] == 0
    always_skip = evaluate_routing(routed, tok, router, prompts, answers, max_new_tokens=3, require_boxed=False, p=-1.0)
    assert always_skip["mean_layers_routed"] == 0 and always_skip["skips"] == 3 * L
    assert always_skip["accuracy_unrouted"] == always_execute["accuracy_unrouted"]


# ---------------------------------------------------------------- entry point


def test_entry_point_bad_flags_one_line(capsys):
    from train.drllm_router import parse_args

    for argv, needle in ((["--p", "2"], "--p must lie in [-1, 1]"), (["--simulations", "0"], "--simulations"),
                         (["--prompt_template", "no field"], "{question}"),
                         (["--min_agreement", "1.5"], "--min_agreement must lie in (0, 1]"),
                         (["--path_length_factor", "-1"], "--path_length_factor must be >= 0"),
                         (["--path_reward", "exact"], "--path_reward")):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


def test_entry_point_search_train_eval_export_and_resume(tiny_model_path, tmp_path, monkeypatch, capsys):
    """The whole script on a tiny random model (rewards from a stub: block 0 must stay)."""
    import routers.traces
    from routers.export import load_router
    from train import drllm_router

    class KeepBlockZero(StubEvaluator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gold = "0"

    monkeypatch.setattr(routers.traces, "GenerationEvaluator", KeepBlockZero)
    out = tmp_path / "run"
    argv = ["--model_name_or_path", tiny_model_path, "--output_dir", str(out), "--num_search_examples", "6",
            "--num_eval_samples", "3", "--simulations", "8", "--max_new_tokens", "2", "--epochs", "3",
            "--progress", "false"]
    summary = drllm_router.main(argv)
    assert summary["search"]["searched"] == summary["search"]["kept"] == 6
    assert summary["heldout"]["examples"] == 3 and summary["heldout"]["num_layers"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["router", "summary.json", "traces.jsonl"]
    from algos.models import load_causal_lm
    router, meta = load_router(out / "router", load_causal_lm(tiny_model_path))
    assert meta["metrics"]["search"]["kept"] == 6 and "val" in meta["metrics"] and meta["p_default"] == -0.5
    text = capsys.readouterr().out
    assert "kept/searched 6/6" in text and "held-out (3 problems)" in text
    KeepBlockZero.built = 0
    drllm_router.main(argv)  # resume: nothing searched again
    assert KeepBlockZero.built == 0
    with pytest.raises(SystemExit) as exit_info:  # other search settings in the same directory
        drllm_router.main(argv + ["--simulations", "9"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after HF's weight-loading bar
    assert err.startswith("error: ") and "mcts.simulations: 8 in the file, 9 now" in err


def test_bench_skip_paths_drop_k_inner_blocks():
    bench = load_script("scripts/bench_drllm.py")
    for k in (0, 1, 4, 8, 28):
        path = bench.skip_path(30, k)
        assert len(path) == 30 - k and path[0] == 0 and path[-1] == 29 and path == sorted(set(path))
    with pytest.raises(SystemExit):
        bench.skip_path(30, 29)


# ---------------------------------------------------------------- candidate search


def test_robust_target_breaks_length_ties_by_search_accuracy():
    """Equally short correct paths: the one right on more search examples wins, whatever its order."""
    from routers.candidate_search import robust_target

    skip3, skip6, dense = (0, 1, 2, 4, 5, 6), (0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5, 6)
    rewards = {dense: 1.0, skip3: 1.0, skip6: 1.0}
    assert robust_target(rewards, {dense: 0.63, skip3: 0.57, skip6: 0.45}) == skip3
    assert robust_target(rewards, {dense: 0.63, skip3: 0.45, skip6: 0.57}) == skip6
    assert robust_target({**rewards, skip3: 0.0}, {dense: 0.63, skip3: 0.57, skip6: 0.45}) == skip6
    assert robust_target({dense: 1.0, (0, 1, 2, 3): 1.0}, {dense: 0.9, (0, 1, 2, 3): 0.1}) == (0, 1, 2, 3)  # shorter first
    assert robust_target({dense: 0.0}, {dense: 0.5}) is None


def test_candidate_search_targets_resume_and_trace_format(routed, tmp_path, monkeypatch):
    """Every candidate is scored on every example; each example's target is the shortest correct
    path (ties: fewer distinct blocks); no correct path -> dropped; a rerun scores nothing again."""
    import routers.candidate_search as cs

    # example i is right under a path iff the path keeps the blocks its gold names ('never': no path)
    calls = []

    def stub(routed_, tokenizer, prompts, golds, path, max_new_tokens, require_boxed, batch_size, budgets, bar):
        calls.append((tuple(path), budgets))
        ok = [g != "never" and {int(c) for c in g} <= set(path) for g in golds]
        return ok, [5 + len(path)] * len(golds)

    monkeypatch.setattr(cs, "path_correctness", stub)
    recs = records(["0123", "012", "03", "never"])
    prompts = [f"p{i}" for i in range(4)]
    skip_sets = cs.parse_skip_sets("3; 1,2 ;2,1;1", L)
    assert skip_sets == [(3,), (1, 2), (1,)]  # sorted, de-duplicated
    traces = cs.candidate_search(routed, CharTokenizer(), recs, prompts, skip_sets, tmp_path, {"dataset": "t"},
                                 max_new_tokens=7, progress=False)
    assert [c[0] for c in calls] == [(0, 1, 2, 3), (0, 1, 2), (0, 3), (0, 2, 3)]
    assert calls[0][1] is None and calls[1][1] == [max(32, 2 * 9)] * 4  # later paths bounded by 2x dense
    assert [t["target"] for t in traces] == [[0, 1, 2, 3], [0, 1, 2], [0, 3], None]
    assert [t["labels"] for t in traces[:3]] == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 1]]
    assert [t["kept"] for t in traces] == [True, True, True, False]
    assert [t["layers_saved"] for t in traces[:3]] == [0, 1, 2]
    s = summarize(traces, L)
    assert (s["searched"], s["kept"], s["base_correct"], s["stop_reasons"]) == (4, 3, 3, {"candidates": 4})
    header, saved = read_traces(tmp_path / "traces.jsonl")
    assert header["settings"]["search"] == "candidates" and saved == traces
    calls.clear()
    again = cs.candidate_search(routed, CharTokenizer(), recs, prompts, skip_sets, tmp_path, {"dataset": "t"},
                                max_new_tokens=7, progress=False)
    assert calls == [] and again == traces  # resumed from candidates.jsonl
    with pytest.raises(TraceError, match="max_new_tokens: 7 in the file, 8 now"):
        cs.candidate_search(routed, CharTokenizer(), recs, prompts, skip_sets, tmp_path, {"dataset": "t"},
                            max_new_tokens=8, progress=False)
    mcts_dir = tmp_path / "mcts"
    mcts_dir.mkdir()
    (mcts_dir / "traces.jsonl").write_text("{}\n")  # an MCTS search's file is never overwritten
    with pytest.raises(TraceError, match="holds an MCTS search"):
        cs.candidate_search(routed, CharTokenizer(), recs, prompts, skip_sets, mcts_dir, {"dataset": "t"},
                            max_new_tokens=7, progress=False)
    assert (mcts_dir / "traces.jsonl").read_text() == "{}\n"


def test_candidate_skip_sets_bad_input_one_line():
    from routers.candidate_search import parse_skip_sets

    for text, needle in (("3;x", "'x' is not a comma-separated list"), ("9", "names block 9"),
                         ("0,1,2,3", "skips every block"), (" ; ", "no candidate skip set")):
        with pytest.raises(TraceError, match=needle) as info:
            parse_skip_sets(text, L)
        assert "\n" not in str(info.value)


def test_path_correctness_equals_one_by_one_generation(routed):
    """Batched scoring of a path gives what each example generated alone gives (greedy, same path)."""
    from routers.candidate_search import path_correctness

    tok = CharTokenizer()
    prompts = ["12", "3456", "7", "890"]
    path = (0, 2, 3)
    alone = []
    for p in prompts:
        ids = tok(p)["input_ids"]
        out = routed.generate(ids, actions=list(path), max_new_tokens=6, pad_token_id=PAD)
        row = out.sequences[0, ids.shape[1]:].tolist()
        end = next((i + 1 for i, t in enumerate(row) if t == 1), len(row))
        alone.append((tok.batch_decode([row[:end]])[0], end))
    golds = [text.lstrip("0") or "0" if i % 2 else "-1" for i, (text, _) in enumerate(alone)]
    correct, lengths = path_correctness(routed, tok, prompts, golds, path, 6, require_boxed=False, batch_size=3)
    assert lengths == [n for _, n in alone]
    from rewards.verify import is_correct
    assert correct == [bool(is_correct(text, g, False)) for (text, _), g in zip(alone, golds)]
    assert any(correct)


def test_entry_point_candidate_search(tiny_model_path, tmp_path, monkeypatch, capsys):
    """--search candidates: the script scores the candidates (stub: block 0 must stay), trains and
    evaluates a router from the targets; a missing or bad --candidate_skips stops in one line."""
    import routers.candidate_search as cs
    from train import drllm_router

    def keep_block_zero(routed_, tokenizer, prompts, golds, path, *args, **kwargs):
        return [0 in path] * len(prompts), [3] * len(prompts)

    monkeypatch.setattr(cs, "path_correctness", keep_block_zero)
    out = tmp_path / "run"
    argv = ["--model_name_or_path", tiny_model_path, "--output_dir", str(out), "--num_search_examples", "6",
            "--num_eval_samples", "3", "--max_new_tokens", "2", "--epochs", "3", "--progress", "false",
            "--search", "candidates"]
    summary = drllm_router.main(argv + ["--candidate_skips", "0;1"])
    s = summary["search"]
    assert (s["searched"], s["kept"], s["mean_layers_saved"], s["stop_reasons"]) == (6, 6, 1, {"candidates": 6})
    assert sorted(p.name for p in out.iterdir()) == ["candidates.jsonl", "router", "summary.json", "traces.jsonl"]
    assert "kept/searched 6/6" in capsys.readouterr().out
    for extra, needle in (([], "--search candidates needs --candidate_skips"),
                          (["--candidate_skips", "0;5"], "names block 5; this model has blocks 0..1")):
        with pytest.raises(SystemExit) as exit_info:
            drllm_router.main(argv + extra + ["--output_dir", str(tmp_path / "other")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert needle in err
    assert not (tmp_path / "other").exists()


def test_screen_script_rows_and_suggestion(tiny_model_path, tmp_path, capsys, monkeypatch):
    """scripts/drllm_screen.py scores dense and each skip set on the search split and suggests
    candidates from the single skips that lose least (no pair that would skip all 2 blocks)."""
    screen = load_script("scripts/drllm_screen.py")
    out = tmp_path / "screen.json"
    rows = screen.main(["--model_name_or_path", tiny_model_path, "--num_problems", "3", "--max_new_tokens", "2",
                        "--top", "2", "--out", str(out)])
    assert [r["skips"] for r in rows] == [[], [0], [1]]  # the tiny model has 2 blocks
    assert all(len(r["correct"]) == 3 and r["lost"] <= sum(rows[0]["correct"]) for r in rows)
    text = capsys.readouterr().out
    assert "skip none (dense)" in text and "suggested: --search candidates --candidate_skips '" in text
    saved = json.loads(out.read_text())
    assert saved["problems"] == 3 and sorted(saved["suggested_candidate_skips"].split(";")) == ["0", "1"]
    with pytest.raises(SystemExit) as exit_info:
        screen.parse_args(["--top", "0"])
    assert exit_info.value.code == 2
    import algos.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the skip sets were checked")

    monkeypatch.setattr(algos.models, "load_causal_lm", no_load)
    with pytest.raises(TraceError, match="names block 5; this model has blocks 0..1"):
        screen.main(["--model_name_or_path", tiny_model_path, "--num_problems", "3", "--skip_sets", "0;5"])


def test_screen_suggestion_keeps_screened_pairs_that_hold_and_drops_broken_ones():
    """The suggestion: the --top singles by net loss, their pairs not screened yet, and screened
    multi-block sets keeping at least half the dense answers (fewest lost first)."""
    screen = load_script("scripts/drllm_screen.py")

    def row(skips, correct):
        dense = [1, 1, 1, 1, 0]
        return {"skips": skips, "correct": correct, "lost": sum(d and not c for d, c in zip(dense, correct)),
                "gained": sum(c and not d for d, c in zip(dense, correct))}

    rows = [row([], [1, 1, 1, 1, 0]), row([3], [1, 1, 1, 0, 0]), row([4], [1, 1, 1, 1, 1]), row([6], [1, 0, 0, 1, 0]),
            row([3, 4], [0, 0, 0, 0, 0]), row([4, 27], [1, 1, 0, 0, 0]), row([3, 27], [1, 1, 1, 0, 1])]
    # singles by net loss: 4 (-1), 3 (+1); pair 3,4 was screened and broke; 3,27 keeps 4 of 4, 4,27 keeps 2
    assert screen.suggest_candidates(rows, 2, 30) == "4;3;3,27;4,27"
    assert screen.suggest_candidates(rows, 3, 30) == "4;3;6;3,6;4,6;3,27;4,27"
    assert screen.suggest_candidates([rows[0], row([3, 4], [0, 0, 0, 0, 0])], 3, 30) == ""
