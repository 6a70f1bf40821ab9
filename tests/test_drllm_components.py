"""Dr.LLM components: MCTS path search, routers with windowed pooling, focal loss, export."""
from __future__ import annotations

import math
import os
import statistics
from collections import Counter

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from routers.export import load_router, save_router  # noqa: E402
from routers.losses import class_weights_from_counts, focal_loss, label_counts  # noqa: E402
from routers.mcts import MCTS, MCTSConfig, edited_paths, mcts_search, random_walk_search, select_target  # noqa: E402
from routers.paths import validate_path  # noqa: E402
from routers.router import BlockRouter, PathRouter, knob_probs, window_pool  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------- MCTS


def essential_stub(num_layers: int, removable: set[int]):
    """Reward 1 iff every block outside ``removable`` is still on the path; counts calls and
    checks every evaluated path is legal (order kept, <= one repeat per block, |pi| <= 2L)."""
    essential = set(range(num_layers)) - removable
    calls: Counter = Counter()

    def evaluate(path):
        validate_path(path, num_layers)
        assert 1 <= len(path) <= 2 * num_layers
        calls[tuple(path)] += 1
        return float(essential <= set(path))

    return evaluate, calls, tuple(sorted(essential))


def test_edited_paths_hand_example():
    got = set(edited_paths((0, 1, 2), 3))
    assert got == {(1, 2), (0, 2), (0, 1), (2,), (0,),              # skip 1 or 2 consecutive
                   (0, 0, 1, 2), (0, 1, 1, 2), (0, 1, 2, 2)}        # repeat one block in place
    # block 0 already repeated: no third run; skipping one copy is a legal edit
    assert set(edited_paths((0, 0, 1), 3)) == {(0, 1), (1,), (0,), (0, 0), (0, 0, 1, 1)}
    assert edited_paths((0,), 1) == [(0, 0)]


def test_ucb_uses_true_depth_and_paper_constants():
    search = MCTS(lambda p: 1.0, num_layers=8)
    node = type(search.root)(path=(0, 1, 2, 4, 5, 7), visits=4, value=3.0)
    want = 3.0 / 4 + 1.8 * math.sqrt(math.log(10) / 4) - 3.0 * 6 / 8
    assert search.ucb(node, parent_visits=10) == pytest.approx(want)
    cfg = MCTSConfig()
    assert (cfg.simulations, cfg.c, cfg.length_penalty, cfg.random_child_prob) == (50, 1.8, 3.0, 0.1)


def test_select_target_shortest_then_fewer_distinct_blocks():
    rewards = {(0, 1, 2, 3): 1.0, (0, 2, 3): 1.0, (1, 1, 3): 1.0, (0, 3): 0.0}
    assert select_target(rewards) == (1, 1, 3)
    assert select_target({(0, 1): 0.0}) is None


def test_tree_really_branches_and_statistics_add_up():
    evaluate, calls, _ = essential_stub(8, {2, 3, 6})
    search = MCTS(evaluate, 8, MCTSConfig(early_stop=False, seed=0))
    result = search.run()
    branching = [n for n in search.nodes if len(n.children) >= 2]
    assert len(branching) >= 2 and any(n is not search.root for n in branching), "the tree must branch below the root"
    assert result.max_depth >= 2 and result.max_children >= 3
    assert search.root.visits == result.simulations + 1 == 51
    for node in search.nodes:  # every visit of a node passed to exactly one child (or evaluated it)
        if node.children:
            assert sum(c.visits for c in node.children) == node.visits - 1
    # memoised: each path evaluated once, and every evaluated path is in the result
    assert max(calls.values()) == 1 and set(calls) == set(result.rewards)
    print(f"\n[mcts] nodes={result.tree_nodes} max_children={result.max_children} depth={result.max_depth} "
          f"evaluations={result.evaluations} (simulations={result.simulations})")


@pytest.mark.parametrize("num_layers, removable, min_hits", [(8, {3}, 12), (6, {1, 2, 4}, 6)])
def test_mcts_finds_known_best_path_where_random_walk_does_worse(num_layers, removable, min_hits):
    seeds = range(20)
    hits = {"mcts": 0, "random_walk": 0}
    saved = {"mcts": [], "random_walk": []}
    for seed in seeds:
        cfg = MCTSConfig(seed=seed, early_stop=False)  # the budget, not an early stop, ends the search
        for name, search in (("mcts", mcts_search), ("random_walk", random_walk_search)):
            evaluate, _, best = essential_stub(num_layers, removable)
            result = search(evaluate, num_layers, cfg)
            assert result.simulations == 50
            hits[name] += result.target == best
            saved[name].append(result.layers_saved)
    print(f"\n[mcts vs random walk] L={num_layers} best saves {len(removable)}: found best "
          f"{hits['mcts']}/20 vs {hits['random_walk']}/20 seeds; mean layers saved "
          f"{statistics.mean(saved['mcts']):.2f} vs {statistics.mean(saved['random_walk']):.2f}")
    assert hits["mcts"] >= min_hits
    assert hits["mcts"] >= hits["random_walk"] + 5
    assert statistics.mean(saved["mcts"]) > statistics.mean(saved["random_walk"]) + 0.5


def test_early_stop_when_a_path_fixes_a_base_error():
    calls = Counter()

    def evaluate(path):  # base wrong; any path that repeats a block is right
        calls[path] += 1
        return float(len(set(path)) < len(path))

    result = mcts_search(evaluate, 6, MCTSConfig(seed=1))
    assert result.stop_reason == "fixed_base_error" and not result.base_correct and result.fixed_base_error
    assert result.simulations < 50 and len(result.target) == 7
    assert sum(result.labels) == 7 and max(result.labels) == 2 and result.labels.count(2) == 1


def test_early_stop_on_short_correct_path_and_budget_otherwise():
    result = mcts_search(lambda p: 1.0, 8, MCTSConfig(seed=0))
    assert result.stop_reason == "short_correct_path" and result.base_correct
    assert len(result.target) <= 8 - 2 and result.layers_saved >= 2
    never = mcts_search(lambda p: 0.0, 8, MCTSConfig(seed=0))
    assert never.stop_reason == "budget" and never.simulations == 50
    assert never.target is None and never.labels is None  # no correct path: the example is dropped


def test_default_path_is_a_target_when_nothing_shorter_is_correct():
    full = tuple(range(5))
    result = mcts_search(lambda p: float(p == full), 5, MCTSConfig(seed=0))
    assert result.target == full and result.labels == [1] * 5 and result.layers_saved == 0


# ---------------------------------------------------------------- routers


def test_block_router_shape_and_init():
    torch.manual_seed(0)
    r = BlockRouter(48)
    first, act, last = r.net
    assert (first.in_features, first.out_features, last.out_features) == (48, 128, 3)
    assert isinstance(act, torch.nn.GELU) and act.approximate == "tanh"
    for lin in (first, last):
        bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))


def test_window_pool_hand_computed():
    hidden = torch.arange(2 * 22 * 2, dtype=torch.float32).view(2, 22, 2)
    mask = torch.zeros(2, 22, dtype=torch.long)
    mask[0, 12:] = 1   # T = 10 (left padded): W = 8 windows of 1 token, last 2 tokens dropped
    mask[1, 2:] = 1    # T = 20: W = 8 windows of 2 tokens, last 4 dropped
    pooled, valid = window_pool(hidden, mask, 8)
    assert valid.all()
    assert torch.equal(pooled[0], hidden[0, 12:20])
    pairs = hidden[1, 2:18].view(8, 2, 2).mean(1)
    assert torch.allclose(pooled[1], pairs)
    short = torch.zeros(1, 22, dtype=torch.long)
    short[0, -3:] = 1  # T = 3: W = 3 windows of 1 token
    pooled, valid = window_pool(hidden[:1], short, 8)
    assert valid[0].tolist() == [True] * 3 + [False] * 5
    assert torch.equal(pooled[0, :3], hidden[0, -3:])


def test_router_logits_average_over_windows():
    torch.manual_seed(0)
    router = PathRouter(num_layers=2, hidden_size=4)
    hidden = torch.randn(1, 6, 4)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])  # T = 5 -> 5 windows of 1 token
    want = router.blocks[1](hidden[0, 1:]).mean(0)
    assert torch.allclose(router.layer_logits(1, hidden, mask)[0], want, atol=1e-6)
    hidden16 = torch.randn(1, 16, 4)  # T = 16 -> 8 windows of 2 tokens
    want16 = router.blocks[0](hidden16[0].view(8, 2, 4).mean(1)).mean(0)
    assert torch.allclose(router.layer_logits(0, hidden16, None)[0], want16, atol=1e-6)


def test_p_knob_segments():
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    assert knob_probs(probs, -1.0).argmax(-1).tolist() == [0, 0]          # always skip
    assert torch.equal(knob_probs(probs, -0.5), probs)                    # the router alone
    assert knob_probs(probs, 0.5).argmax(-1).tolist() == [1, 1]           # always execute
    assert knob_probs(probs, 1.0).argmax(-1).tolist() == [2, 2]           # always repeat
    assert knob_probs(probs, 0.0).tolist()[0] == pytest.approx([0.1, 0.65, 0.25])
    with pytest.raises(ValueError):
        knob_probs(probs, 1.5)


# ---------------------------------------------------------------- focal loss


def test_class_weights_from_counts_hand_computed():
    beta = 0.999
    w0 = (1 - beta) / (1 - beta ** 10)     # 0.100450...
    w1 = (1 - beta) / (1 - beta ** 100)    # 0.010503...
    got = class_weights_from_counts([10, 100, 0], beta)
    assert got.tolist() == pytest.approx([3 * w0 / (w0 + w1), 3 * w1 / (w0 + w1), 0.0], rel=1e-6)
    assert got.tolist() == pytest.approx([2.71601, 0.28399, 0.0], rel=1e-4)
    labels = torch.tensor([[1, 1, 2, 0], [1, 0, 1, 1], [1, 1, 1, -100]])
    assert label_counts(labels).tolist() == [2, 8, 1]
    w = class_weights_from_counts(label_counts(labels))
    raw = [(1 - beta) / (1 - beta ** n) for n in (2, 8, 1)]
    assert w.tolist() == pytest.approx([3 * r / sum(raw) for r in raw], rel=1e-6)
    assert float(w.sum()) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        class_weights_from_counts([0, 0, 0])


def test_focal_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], requires_grad=True)
    targets = torch.tensor([0, 2])
    alpha = torch.tensor([0.5, 1.0, 2.0])
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    p1 = 1 / 3
    want = -(0.5 * (1 - p0) ** 2 * math.log(p0) + 2.0 * (1 - p1) ** 2 * math.log(p1)) / 2
    loss = focal_loss(logits, targets, alpha, gamma=2.0)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    ce = torch.nn.functional.cross_entropy(logits.detach(), targets)
    assert float(focal_loss(logits.detach(), targets, None, gamma=0.0)) == pytest.approx(float(ce), rel=1e-6)
    ignored = focal_loss(logits.detach(), torch.tensor([0, -100]), alpha, gamma=2.0)
    assert float(ignored) == pytest.approx(-0.5 * (1 - p0) ** 2 * math.log(p0), rel=1e-6)


# ---------------------------------------------------------------- export


def _model(seed: int, layers: int = 3):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.config._name_or_path = f"tiny-{seed}-{layers}"
    return model


def test_export_round_trip_and_wrong_model_errors(tmp_path):
    model = _model(0)
    torch.manual_seed(1)
    router = PathRouter(3, 32)
    out = save_router(router, tmp_path / "router", model, metrics={"macro_f1": 0.61}, p_default=-0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]  # no temp dirs left behind
    loaded, meta = load_router(out, model)
    for k, v in router.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert meta["num_windows"] == 8 and meta["router_hidden"] == 128 and meta["p_default"] == -0.5
    assert meta["metrics"] == {"macro_f1": 0.61}
    assert meta["base_model"]["name"] == "tiny-0-3" and meta["base_model"]["num_hidden_layers"] == 3

    with pytest.raises(ValueError, match="fingerprint") as other_weights:
        load_router(out, _model(5))                   # same shapes, other weights
    with pytest.raises(ValueError, match="num_hidden_layers") as other_depth:
        load_router(out, _model(0, layers=4))
    for err in (other_weights, other_depth):
        assert "\n" not in str(err.value) and "tiny-0-3" in str(err.value)
    with pytest.raises(ValueError, match="no router export"):
        load_router(tmp_path / "missing", model)
    with pytest.raises(ValueError):
        save_router(PathRouter(2, 32), tmp_path / "bad", model)  # router sized for another model
