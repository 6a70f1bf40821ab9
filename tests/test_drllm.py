"""Dr.LLM routed model: exactness against the plain HF model and an "unrolled" HF model.

The unrolled reference for a path pi is a plain LlamaForCausalLM with len(pi) blocks whose
block i is a copy of block pi_i: HF's own forward, cache and generate then compute exactly
"skip / execute / repeat" with a separate cache slot per pass. Tiny random models only.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from algos.hf_compat import cache_arg  # noqa: E402
from rewards.verify import is_correct  # noqa: E402
from routers.path_eval import GenerationEvaluator  # noqa: E402
from routers.paths import actions_to_path, as_action_table, path_to_actions, validate_path  # noqa: E402
from routers.routed_model import PathCache, RoutedModel, positions_from_mask  # noqa: E402
from routers.router import PathRouter  # noqa: E402

torch.set_num_threads(1)
L = 4
VOCAB = 97
PAD, EOS = 0, 1


def tiny_config(num_layers: int = L) -> LlamaConfig:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, rms_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    return cfg


def tiny_model(seed: int = 0, num_layers: int = L) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(num_layers)).eval()
    with torch.no_grad():  # larger weights than the default init, so blocks really change the states
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def unrolled(model: LlamaForCausalLM, path) -> LlamaForCausalLM:
    """A plain HF model whose block i is a copy of ``model``'s block path[i]."""
    cfg = tiny_config(len(path))
    ref = LlamaForCausalLM(cfg).eval()
    src = model.state_dict()
    state = {}
    for k in ref.state_dict():
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            state[k] = src[f"model.layers.{path[int(i)]}.{rest}"]
        else:
            state[k] = src[k]
    ref.load_state_dict(state)
    ref.generation_config.pad_token_id = PAD
    ref.generation_config.eos_token_id = EOS
    return ref


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def routed(model):
    return RoutedModel(model)


def batch_inputs(lengths=(9, 6, 4), seed: int = 1):
    """Left-padded batch of random prompts (no EOS inside)."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, t - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, t - n:] = 1
    return ids, mask


# ---------------------------------------------------------------- paths


def test_path_action_round_trip_and_validation():
    assert path_to_actions([0, 1, 1, 3], 4) == [1, 2, 0, 1]
    assert actions_to_path([1, 2, 0, 1]) == (0, 1, 1, 3)
    assert actions_to_path(torch.tensor([0, 0, 0, 0])) == ()
    table = as_action_table([[0, 1, 2, 3], [1, 1, 3]], 2, 4)
    assert table.tolist() == [[1, 1, 1, 1], [0, 2, 0, 1]]
    assert as_action_table([0, 2, 2], 3, 4).tolist() == [[1, 0, 2, 0]] * 3  # one path for all rows
    for bad in ([1, 0], [0, 4], [2, 2, 2]):
        with pytest.raises(ValueError):
            validate_path(bad, 4)


# ---------------------------------------------------------------- all-execute == plain model


def test_all_execute_prefill_logits_identical(model, routed):
    ids, mask = batch_inputs()
    pos = positions_from_mask(mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = routed(ids, mask, actions=list(range(L))).logits
    assert torch.equal(ref, out), (ref - out).abs().max()


def test_all_execute_cached_decoding_identical(model, routed):
    ids, mask = batch_inputs()
    steps = torch.randint(3, VOCAB, (ids.shape[0], 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf_cache, my_cache = DynamicCache(config=model.config), PathCache(model.config, L)
        pos = positions_from_mask(mask)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_arg(hf_cache),
                    use_cache=True).logits
        out = routed(ids, mask, actions=torch.ones(L, dtype=torch.long), past_key_values=my_cache).logits
        assert torch.equal(ref, out)
        for s in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            pos = pos[:, -1:] + 1
            tok = steps[:, s:s + 1]
            ref = model(input_ids=tok, attention_mask=mask, position_ids=pos, **cache_arg(hf_cache),
                        use_cache=True).logits
            out = routed(tok, mask, actions=torch.ones(L, dtype=torch.long), past_key_values=my_cache,
                         position_ids=pos).logits
            assert torch.equal(ref, out), (s, (ref - out).abs().max())
    assert my_cache.seen_tokens == ids.shape[1] + steps.shape[1]


def test_all_execute_generate_matches_hf_generate(model, routed):
    ids, mask = batch_inputs()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    out = routed.generate(ids, mask, actions=list(range(L)), max_new_tokens=8)
    assert torch.equal(ref, out.sequences)
    assert out.layers_executed.tolist() == [L] * 3 and out.mean_layers_executed == L


# ---------------------------------------------------------------- repeat / skip semantics


def _block_stack(model, hidden, mask, path):
    """Apply model's blocks in ``path`` order to ``hidden`` (no cache), with HF's mask and RoPE."""
    from transformers.masking_utils import create_causal_mask

    pos = positions_from_mask(mask)
    causal = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask,
                                **cache_arg(None), position_ids=pos)
    cos_sin = model.model.rotary_emb(hidden, position_ids=pos)
    for i in path:
        hidden = model.model.layers[i](hidden, attention_mask=causal, position_ids=pos,
                                       position_embeddings=cos_sin)
    return hidden


def test_repeat_equals_block_applied_twice_without_cache(model, routed):
    ids, mask = batch_inputs()
    path = [0, 1, 1, 2, 3]
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)
        manual = _block_stack(model, emb, mask, path)
        out = routed(ids, mask, actions=path, output_hidden_states=True)
        once = _block_stack(model, emb, mask, [0, 1, 2, 3])
    assert torch.allclose(out.hidden_states, manual, atol=1e-5)
    assert not torch.allclose(manual, once, atol=1e-2)  # the repeat really changes the states


def test_repeat_with_cache_equals_block_applied_twice(model, routed):
    """Prefill + step decoding with the cache == the full sequence without cache (1e-5), and
    == HF's own cached generate of the unrolled model (two separate cache slots)."""
    ids, mask = batch_inputs()
    path = [0, 1, 1, 2, 2, 3]
    full = torch.cat([ids, torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))], 1)
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)
    t0 = ids.shape[1]
    with torch.no_grad():
        ref = routed(full, full_mask, actions=path).logits
        cache = routed.new_cache()
        pieces = [routed(ids, mask, actions=path, past_key_values=cache).logits]
        for s in range(4):
            pos = positions_from_mask(full_mask[:, :t0 + s + 1])[:, -1:]
            pieces.append(routed(full[:, t0 + s:t0 + s + 1], full_mask[:, :t0 + s + 1], actions=path,
                                 past_key_values=cache, position_ids=pos).logits)
        stepped = torch.cat(pieces, dim=1)
        hf = unrolled(model, path)(input_ids=full, attention_mask=full_mask,
                                   position_ids=positions_from_mask(full_mask)).logits
    valid = full_mask.bool()
    assert torch.allclose(stepped[valid], ref[valid], atol=1e-5), (stepped - ref)[valid].abs().max()
    assert torch.allclose(ref[valid], hf[valid], atol=1e-5)
    # HF generate of the unrolled model (its own cache: one slot per unrolled block) == ours
    gen_ref = unrolled(model, path).generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    gen = routed.generate(ids, mask, actions=path, max_new_tokens=6)
    assert torch.equal(gen_ref, gen.sequences)
    assert gen.layers_executed.tolist() == [6, 6, 6]


def test_skip_is_identity(model, routed):
    ids, mask = batch_inputs()
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)
        none = routed(ids, mask, actions=[], output_hidden_states=True).hidden_states
        skip12 = routed(ids, mask, actions=[0, 3], output_hidden_states=True).hidden_states
        manual = _block_stack(model, emb, mask, [0, 3])
    assert torch.equal(none, emb)  # skipping every block leaves the embeddings untouched
    assert torch.allclose(skip12, manual, atol=1e-6)


# ---------------------------------------------------------------- mixed paths in one batch


def test_mixed_paths_batch_equals_each_sequence_alone(model, routed):
    lengths = (9, 6, 4, 7)
    ids, mask = batch_inputs(lengths)
    paths = [[0, 1, 2, 3], [0, 0, 2, 3, 3], [1, 1], []]
    with torch.no_grad():
        batched = routed(ids, mask, actions=paths).logits
        gen = routed.generate(ids, mask, actions=paths, max_new_tokens=6)
        for b, (n, path) in enumerate(zip(lengths, paths)):
            alone_ids, alone_mask = ids[b:b + 1, -n:], mask[b:b + 1, -n:]
            alone = routed(alone_ids, alone_mask, actions=path).logits
            assert torch.allclose(batched[b, -n:], alone[0], atol=1e-5), b
            ref = unrolled(model, path)(input_ids=alone_ids).logits if path else None
            if ref is not None:
                assert torch.allclose(alone, ref, atol=1e-5), b
            alone_gen = routed.generate(alone_ids, alone_mask, actions=path, max_new_tokens=6)
            new = gen.sequences[b, ids.shape[1]:]
            assert torch.equal(new[: alone_gen.sequences.shape[1] - n], alone_gen.sequences[0, n:]), b
    assert gen.layers_executed.tolist() == [4, 5, 2, 0]
    assert gen.actions.tolist() == [path_to_actions(p, L) for p in paths]


def test_generate_stops_at_eos_and_pads_finished_rows(model, routed):
    ids, mask = batch_inputs()
    with torch.no_grad():
        first = routed.generate(ids, mask, actions=[0, 1, 1, 3], max_new_tokens=1).sequences[:, -1]
    eos = int(first[0])  # make row 0 stop immediately
    out = routed.generate(ids, mask, actions=[0, 1, 1, 3], max_new_tokens=5, eos_token_id=eos, pad_token_id=PAD)
    ref = unrolled(model, [0, 1, 1, 3]).generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                                 eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(out.sequences, ref)
    assert out.sequences[0, ids.shape[1]] == eos and (out.sequences[0, ids.shape[1] + 1:] == PAD).all()


def test_decode_from_resumes_generate_from_a_prefilled_cache(routed):
    """Prefilling prompt + the first k generated tokens and resuming with ``decode_from`` gives
    ``generate``'s sequence (a path with a skip and a repeat, a left-padded batch)."""
    ids, mask = batch_inputs()
    path, k = [0, 1, 1, 3], 2  # row 2 ends (EOS) at its third new token: in the resumed part
    full = routed.generate(ids, mask, actions=path, max_new_tokens=9, pad_token_id=PAD).sequences
    head = full[:, :ids.shape[1] + k]
    head_mask = torch.cat([mask, mask.new_ones(mask.shape[0], k)], dim=-1)
    cache = routed.new_cache()
    out = routed(head, head_mask, actions=path, past_key_values=cache, logits_to_keep=1)
    resumed = routed.decode_from(out.logits[:, -1], cache, out.actions, head, head_mask, 9 - k, pad_token_id=PAD)
    assert full[2, ids.shape[1] + k] == EOS and (full[2, ids.shape[1] + k + 1:] == PAD).all()
    assert torch.equal(resumed.sequences, full)
    assert resumed.layers_executed.tolist() == [len(path)] * 3


def test_path_cache_builds_from_either_transformers_cache_kwargs_form(model, routed, monkeypatch):
    """transformers before 5.19 returns one kwargs dict for all layers, 5.19+ one per layer: the
    routed cache takes both, and a path with a repeat decodes the same either way."""
    import transformers.cache_utils as cache_utils

    from algos.hf_compat import cache_layer_types_and_kwargs

    ids, mask = batch_inputs()
    path = [0, 1, 1, 3]  # block 1 repeated, block 2 skipped
    want = routed.generate(ids, mask, actions=path, max_new_tokens=4).sequences
    native = cache_utils.get_layer_types_and_kwargs

    def shared_dict(config):  # the pre-5.19 form
        types, kwargs = native(config)
        return types, (kwargs[0] if isinstance(kwargs, list) else kwargs)

    monkeypatch.setattr(cache_utils, "get_layer_types_and_kwargs", shared_dict)
    types, kwargs = cache_layer_types_and_kwargs(model.config)
    assert len(types) == len(kwargs) == L and all(isinstance(k, dict) for k in kwargs)
    assert len(routed.new_cache().layers) == 2 * L
    assert torch.equal(routed.generate(ids, mask, actions=path, max_new_tokens=4).sequences, want)


# ---------------------------------------------------------------- routing decisions at prefill only


def test_decide_called_once_per_block_at_prefill_and_reused(model, routed):
    ids, mask = batch_inputs()
    want = torch.tensor([[1, 0, 2, 1], [0, 2, 1, 1], [1, 1, 1, 0]])
    calls, seen = [], {}
    emb = model.model.embed_tokens(ids)

    def decide(layer, hidden, token_mask):
        calls.append((layer, hidden.shape[1]))
        seen[layer] = hidden.clone()
        assert token_mask.shape == hidden.shape[:2]
        return want[:, layer]

    with torch.no_grad():
        out = routed.generate(ids, mask, decide=decide, max_new_tokens=5)
        ref = routed.generate(ids, mask, actions=want, max_new_tokens=5)
    assert calls == [(layer, ids.shape[1]) for layer in range(L)]  # prefill only, one call per block
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.actions, want)
    assert torch.equal(seen[0], emb)  # block 0's router reads the embeddings
    with torch.no_grad():  # block 2's router reads the states after the routed blocks 0 and 1
        for b in range(3):
            n = int(mask[b].sum())
            manual = _block_stack(model, emb[b:b + 1, -n:], mask[b:b + 1, -n:], actions_to_path(want[b, :2]))
            assert torch.allclose(seen[2][b, -n:], manual[0], atol=1e-5)


def test_router_decider_drives_generation(model, routed):
    ids, mask = batch_inputs()
    router = PathRouter(L, model.config.hidden_size)
    out = routed.generate(ids, mask, decide=router.decider(), max_new_tokens=3)
    ref = routed.generate(ids, mask, actions=out.actions, max_new_tokens=3)
    assert torch.equal(out.sequences, ref.sequences)
    always_repeat = routed.generate(ids, mask, decide=router.decider(p=1.0), max_new_tokens=3)
    assert (always_repeat.actions == 2).all() and always_repeat.layers_executed.tolist() == [2 * L] * 3


def test_rejects_bad_arguments(model, routed):
    ids, mask = batch_inputs()
    with pytest.raises(ValueError, match="exactly one"):
        routed(ids, mask)
    with pytest.raises(ValueError, match="shape"):
        routed(ids, mask, actions=torch.ones(3, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        routed(ids, mask[:, 1:], actions=torch.ones(L, dtype=torch.long))


# ---------------------------------------------------------------- MCTS reward from generation


class _CharTokenizer:
    """Stand-in tokenizer: token id t >= 3 decodes to chr(ord('a') + t % 26)."""

    pad_token_id = PAD

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = torch.tensor([[3 + (ord(c) % 90) for c in text]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(ord("a") + int(t) % 26) for t in row if int(t) >= 3) for row in rows]

    def decode(self, row, skip_special_tokens=True):
        return self.batch_decode([row])[0]


def test_generation_evaluator_batches_paths_like_single_calls(routed):
    tok = _CharTokenizer()
    paths = [(0, 1, 2, 3), (0, 2, 2, 3), (1, 3)]
    ev = GenerationEvaluator(routed, tok, "what is 2+2", gold="4", max_new_tokens=4)
    batch = ev.completions(paths)
    single = [ev.completions([p])[0] for p in paths]
    assert batch == single and ev.generations == 6
    reward = ev(paths[1])
    assert reward == float(is_correct(ev.last_completions[paths[1]], "4")) and ev.generations == 7


def test_decoding_with_another_path_than_prefill_is_refused(routed):
    ids, mask = batch_inputs()
    cache = routed.new_cache()
    out = routed(ids, mask, actions=[0, 1, 2, 3], past_key_values=cache)
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    with pytest.raises(ValueError, match="prefill"):
        routed(ids[:, -1:], step_mask, actions=[0, 1, 1, 3], past_key_values=cache)
    with pytest.raises(ValueError, match="prefill only"):
        routed(ids[:, -1:], step_mask, decide=lambda layer, h, m: torch.ones(3), past_key_values=cache)
    routed(ids[:, -1:], step_mask, actions=out.actions, past_key_values=cache)  # the prefill's own table


@pytest.mark.parametrize("family, extra", [
    ("qwen2", {}),
    ("qwen3", {}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),  # sliding masks
])
def test_qwen_families_match_hf_generate_and_mix_paths(family, extra):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cfg_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=PAD,
                  eos_token_id=EOS, **extra)
    cfg._attn_implementation = "sdpa"
    model = model_cls(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    routed = RoutedModel(model)
    lengths = (9, 6, 4)
    ids, mask = batch_inputs(lengths)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(routed.generate(ids, mask, actions=[0, 1, 2], max_new_tokens=6).sequences, ref)
    paths = [[0, 1, 2], [0, 0, 2], [1, 1, 2, 2]]
    with torch.no_grad():
        mixed = routed(ids, mask, actions=paths).logits
        for b, n in enumerate(lengths):
            alone = routed(ids[b:b + 1, -n:], mask[b:b + 1, -n:], actions=paths[b]).logits
            assert torch.allclose(mixed[b, -n:], alone[0], atol=1e-5)


def _plain_greedy(routed, ev, path, max_new_tokens):
    out = routed.generate(ev.input_ids, ev.attention_mask, actions=[list(path)], max_new_tokens=max_new_tokens,
                          pad_token_id=PAD)
    return ev._trim(out.sequences[0, ev.input_ids.shape[1]:]).tolist()


def test_draft_verified_completions_equal_plain_greedy_decoding(routed):
    """Every path's draft-verified completion is its own greedy decode: accepted drafts, misses at
    the first token, misses later (then decoding continues from the cropped cache), EOS endings."""
    import random

    tok = _CharTokenizer()
    ev = GenerationEvaluator(routed, tok, "what is 2+2", gold="4", max_new_tokens=12)
    dense = tuple(range(L))
    ev.completion_ids([dense])
    assert ev.draft is not None and ev.draft.tolist() == _plain_greedy(routed, ev, dense, 12)
    rng = random.Random(0)
    paths = [dense, (0, 1, 2), (0, 2, 3), (1, 2, 3), (0, 0, 1, 2, 3), (0, 1, 2, 3, 3), (3,), (0, 1, 1, 3)]
    paths += [tuple(sorted(rng.sample(range(L), rng.randint(1, L)))) for _ in range(12)]
    misses = []
    for path in paths:
        got = ev.completion_ids([path])[0].tolist()
        assert got == _plain_greedy(routed, ev, path, 12), path
        common = next((i for i, (a, b) in enumerate(zip(got, ev.draft.tolist())) if a != b), None)
        misses.append(common)
    assert ev._verified(dense).tolist() == ev.draft.tolist() and ev.draft_accepted == 1  # a full accept
    assert any(m == 0 for m in misses) and any(m not in (None, 0) for m in misses)  # both miss branches ran


def test_length_factor_bounds_a_diverging_path_to_a_prefix_of_its_greedy_decode(routed):
    tok = _CharTokenizer()
    ev = GenerationEvaluator(routed, tok, "what is 2+2", gold="4", max_new_tokens=80, length_factor=0.1)
    dense = tuple(range(L))
    ev.completion_ids([dense])
    bound = max(32, -(-len(ev.draft) * 1 // 10))
    for path in [(0, 2, 3), (1, 2, 3), (3,)]:
        got = ev.completion_ids([path])[0].tolist()
        full = _plain_greedy(routed, ev, path, 80)
        assert len(got) <= bound and got == full[:len(got)]
        assert len(got) == min(bound, len(full))
    with pytest.raises(ValueError, match="length_factor"):
        GenerationEvaluator(routed, tok, "x", gold="4", length_factor=0)


def test_agreement_reward_by_hand(routed):
    """reward = dense right and teacher-forced agreement >= min and the answer kept; base errors unsearched."""
    tok = _CharTokenizer()
    dense = tuple(range(L))
    ev = GenerationEvaluator(routed, tok, "what is 2+2", gold="x", max_new_tokens=12, reward="agreement",
                             min_agreement=0.5)
    text = ev.completions([dense])[0]
    ev._dense_text, ev._dense_right = text, True  # a random model writes no right answer: take it as right
    assert ev(dense) == 1.0
    for path in [(0, 1, 2), (1, 2, 3), (3,), (0, 0, 1, 2, 3)]:
        ids = torch.cat([ev.input_ids, ev.draft[None]], dim=1)
        logits = routed(ids, torch.ones_like(ids), actions=[list(path)]).logits[0]
        P, D = ev.input_ids.shape[1], len(ev.draft)
        same = logits[P - 1:P + D - 1].argmax(-1) == ev.draft
        want = float(same.float().mean() >= 0.5 and bool(same[ev.answer_start():].all()))
        assert ev(path) == want and ev.agreements[path] == pytest.approx(float(same.float().mean()))
    assert ev.draft_accepted == sum(share == 1.0 for share in ev.agreements.values())
    wrong = GenerationEvaluator(routed, tok, "what is 2+2", gold="never", max_new_tokens=12, reward="agreement")
    assert wrong.searches_base_errors is False and wrong(dense) == 0.0 and wrong((0, 1, 2)) == 0.0
    from routers.mcts import MCTSConfig, mcts_search
    result = mcts_search(GenerationEvaluator(routed, tok, "what is 2+2", gold="never", max_new_tokens=12,
                                             reward="agreement"), L, MCTSConfig(simulations=5))
    assert result.stop_reason == "base_error_not_searched" and result.evaluations == 1 and result.target is None


def test_batched_dense_completions_are_the_drafts(routed):
    from routers.path_eval import dense_completions

    tok = _CharTokenizer()
    prompts = ["what is 2+2", "3+4", "a longer question here"]
    rows = dense_completions(routed, tok, prompts, 8, batch_size=2)
    for prompt, row in zip(prompts, rows):
        ev = GenerationEvaluator(routed, tok, prompt, gold="4", max_new_tokens=8, draft=row)
        alone = GenerationEvaluator(routed, tok, prompt, gold="4", max_new_tokens=8)
        assert ev.completion_ids([tuple(range(L))])[0].tolist() == alone.completion_ids([tuple(range(L))])[0].tolist()
