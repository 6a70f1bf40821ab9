"""deploy.decoder.EfficientDecoder: every part off equals HF generate, each part composes exactly
(routed caches through EAGER forks, LYNX rollbacks inside EAGER), bundle loading and stats."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from algos.rollout.eager import EagerParams, eager_generate
from algos.models import load_tokenizer
from deploy.decoder import DecoderError, EfficientDecoder
from probes.conformal import ConformalCalibration
from probes.cues import CueConfig
from probes.early_exit import ExitController, lynx_generate
from probes.export import LynxProbe
from probes.probe import ExitProbe
from routers.routed_lm import RoutedCausalLM
from routers.routed_model import RoutedModel
from routers.router import PathRouter

PROMPTS = ["What is 3 + 4?", "Compute 12 * 7, then subtract 5."]


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return load_tokenizer(tiny_model_path)


def batch(tok, texts=PROMPTS):
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def always_exit_probe(model, cues=("e",)) -> LynxProbe:
    """A probe that exits at every cue: p(safe) ~ 1, and thresholds every p clears."""
    from algos.fingerprint import base_identity

    probe = ExitProbe(2 * model.config.hidden_size, (8,))
    with torch.no_grad():
        probe.mlp[-1].bias.fill_(20.0)
    return LynxProbe(probe=probe.eval(), calibration=ConformalCalibration([0.5] * 20, [0.1] * 20), layers=(1, 2),
                     cue_config=CueConfig(cues, word_boundary=False, region_end=()), exit_string=" Final: \\boxed{",
                     base_model=base_identity(model), answer_max_tokens=5)


def hf_generate(model, tok, seed, **sampling):
    ids, mask = batch(tok)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, pad_token_id=tok.pad_token_id,
                         **sampling)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"do_sample": True, "temperature": 0.9, "top_k": 0,
                                                              "top_p": 1.0}])
def test_everything_off_equals_plain_generate(model, tok, sampling):
    expected = hf_generate(model, tok, seed=3, **sampling)
    out = EfficientDecoder(model, tok).generate(PROMPTS, max_new_tokens=10, seed=3, **sampling)
    for row, seq in zip(expected.tolist(), out.sequences):
        n = seq.num_tokens
        assert seq.token_ids == row[:n] and all(t == tok.pad_token_id for t in row[n:])
        assert seq.text == tok.decode(row[:n], skip_special_tokens=True)
        assert seq.layers_executed == seq.num_layers == 2 and not seq.exited and seq.parent is None


def test_neutral_parts_equal_plain_generate(model, tok):
    """Dense routing path, a never-firing probe and EAGER with theta = inf each reproduce generate."""
    ids, mask = batch(tok)
    sampled = hf_generate(model, tok, seed=5, do_sample=True, temperature=0.8, top_k=0, top_p=1.0)
    dense = RoutedCausalLM(model, actions=[0, 1])
    torch.manual_seed(5)
    routed = lynx_generate(dense, tok, ids, mask, max_new_tokens=10, do_sample=True, temperature=0.8,
                           pad_token_id=tok.pad_token_id)
    assert torch.equal(routed.sequences[:, ids.shape[1]:], sampled)
    torch.manual_seed(5)
    params = EagerParams(max_sequences=1, threshold=float("inf"), max_new_tokens=10, temperature=0.8)
    eager = eager_generate(dense, ids, mask, params, [tok.eos_token_id])
    for seq, row in zip(eager, sampled.tolist()):
        assert seq.token_ids == row[:len(seq.token_ids)]


def teacher_forced_logprobs(model_fn, tok, prompt_ids, prompt_mask, response, temperature):
    """log softmax(z / T) of each response token from one full forward (no cache)."""
    ids = torch.cat([prompt_ids, torch.tensor([response])], dim=1)
    mask = torch.cat([prompt_mask, torch.ones(1, len(response), dtype=torch.long)], dim=1)
    logits = model_fn(ids, mask)[0, prompt_ids.shape[1] - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


def test_routed_paths_survive_eager_forks(model, tok):
    """Per-row paths (one skips block 0, one repeats block 1) through EAGER's forks and dropped rows:
    every sequence's recorded log-probs equal a fresh routed forward over its whole text."""
    ids, mask = batch(tok)
    table = torch.tensor([[0, 1], [1, 2]])
    routed = RoutedCausalLM(model, actions=table)
    params = EagerParams(max_sequences=4, threshold=0.0, entropy_top_k=5, max_new_tokens=8, temperature=0.9)
    torch.manual_seed(0)
    seqs = eager_generate(routed, ids, mask, params, [tok.eos_token_id])
    assert len(seqs) > 2 and any(s.parent is not None for s in seqs)
    dense = RoutedModel(model)
    for s in seqs:
        i = s.prompt_index
        p_ids, p_mask = ids[i:i + 1], mask[i:i + 1]
        fresh = teacher_forced_logprobs(lambda x, m: dense(x, m, actions=table[i:i + 1]).logits, tok, p_ids, p_mask,
                                        s.token_ids, 0.9)
        torch.testing.assert_close(torch.tensor(s.logprobs), fresh, atol=2e-4, rtol=0)
    assert routed.prompt_layers_executed(2) == [1, 3]


def test_lynx_exits_inside_eager_roll_back_the_cue(model, tok):
    """Every cue exits: each exited sequence is thinking + exit string + greedy answer, and its
    log-probs equal a fresh forward over exactly those tokens (the cue token left the context)."""
    ids, mask = batch(tok)
    probe = always_exit_probe(model)
    exits = ExitController(tok, probe, num_layers=2, hidden_size=model.config.hidden_size, confidence=0.9)
    params = EagerParams(max_sequences=3, threshold=0.5, entropy_top_k=5, max_new_tokens=12, temperature=0.9)
    torch.manual_seed(1)
    seqs = eager_generate(model, ids, mask, params, [tok.eos_token_id], exits=exits)
    exited = [s for s in seqs if s.exited]
    assert exited, "the always-exit probe should exit somewhere"
    for s in exited:
        k = s.exit_index
        assert s.token_ids[k:k + len(exits.exit_ids)] == exits.exit_ids
        assert len(s.token_ids) - k - len(exits.exit_ids) <= probe.answer_max_tokens
        i = s.prompt_index
        fresh = teacher_forced_logprobs(lambda x, m: model(input_ids=x, attention_mask=m).logits, tok,
                                        ids[i:i + 1], mask[i:i + 1], s.token_ids, 0.9)
        torch.testing.assert_close(torch.tensor(s.logprobs), fresh, atol=2e-4, rtol=0)
        answer = s.token_ids[k + len(exits.exit_ids):]  # greedy: the argmax of the fresh logits
        full = torch.cat([ids[i:i + 1], torch.tensor([s.token_ids])], 1)
        m = torch.cat([mask[i:i + 1], torch.ones(1, len(s.token_ids), dtype=torch.long)], 1)
        logits = model(input_ids=full, attention_mask=m).logits[0]
        start = ids.shape[1] + k + len(exits.exit_ids)
        for j, t in enumerate(answer):
            assert int(logits[start + j - 1].argmax()) == t


@pytest.mark.parametrize("spelling", ["</think>", " </think>"])
def test_eager_stops_branching_after_end_of_thinking(model, tok, spelling):
    """The default tokenizer spells '</think>' with three tokens ('</' or ' </', 'think', '>'). Forced
    as response tokens 1..3 of every sequence (high-entropy steps before and after): sequences fork
    at step 0 only, never after the marker."""
    marker = tok.encode(spelling, add_special_tokens=False)
    assert len(marker) > 1  # not one token in this vocabulary: the multi-token path is what is tested
    calls = {"n": 0}

    def force_marker(module, args, kwargs, output):  # forward c produces the logits of response token c
        k, calls["n"] = calls["n"] - 1, calls["n"] + 1
        if 0 <= k < len(marker):
            output.logits[:, -1] = -1e4
            output.logits[:, -1, marker[k]] = 1e4
        return output

    handle = model.register_forward_hook(force_marker, with_kwargs=True)
    try:
        out = EfficientDecoder(model, tok).generate(PROMPTS, branching=True, do_sample=True, temperature=1.0,
                                                    max_new_tokens=10, branch_threshold=0.5, entropy_top_k=5,
                                                    max_branches=8, seed=0)
    finally:
        handle.remove()
    assert all(s.token_ids[1:1 + len(marker)] == marker for s in out.sequences)
    forks = [s.fork_step for s in out.sequences if s.parent is not None]
    assert forks and all(step == 0 for step in forks), forks  # step 0 forks; none after the marker
    assert out.generated_tokens == out.total_tokens  # forks at step 0 copy no prefix


def test_end_think_ids_one_token_or_its_encodings(tok):
    import copy

    from algos.rollout.eager_engine import end_think_ids

    assert end_think_ids(tok) == [tok.encode("</think>", add_special_tokens=False),
                                  tok.encode(" </think>", add_special_tokens=False)]
    thinking = copy.deepcopy(tok)
    thinking.add_tokens(["</think>"])  # what the thinking default's tokenizer has
    assert end_think_ids(thinking) == [[thinking.convert_tokens_to_ids("</think>")]]


def test_every_subset_from_a_bundle(tiny_model_path, model, tmp_path):
    from deploy.bundle import export_bundle
    from probes.export import save_probe
    from routers.export import save_router

    probe_dir = save_probe(tmp_path / "lynx", always_exit_probe(model))
    router = PathRouter(2, model.config.hidden_size)
    router_dir = save_router(router, tmp_path / "router", model)
    bundle = export_bundle(tiny_model_path, tmp_path / "bundle", probe_dir, router_dir)
    decoder = EfficientDecoder.from_pretrained(str(bundle))
    assert decoder.probe is not None and decoder.router is not None
    # a router job's output_dir (router/ inside) is accepted too
    assert EfficientDecoder.from_pretrained(tiny_model_path, router=str(tmp_path)).router is not None
    for lynx in (False, True):
        for routing in (False, True):
            for branching in (False, True):
                out = decoder.generate(PROMPTS, early_exit=lynx, confidence=0.9, routing=routing, branching=branching,
                                       max_new_tokens=8, do_sample=True, temperature=0.9, seed=0, max_branches=3,
                                       branch_threshold=0.5)
                groups = out.by_prompt()
                assert len(groups) == 2 and all(1 <= len(g) <= (3 if branching else 1) for g in groups)
                for s in out.sequences:
                    assert 0 < s.num_tokens and s.text == decoder.tokenizer.decode(s.token_ids, skip_special_tokens=True)
                    if not lynx:
                        assert not s.exited and s.num_tokens <= 8
                    if not routing:
                        assert s.layers_executed == 2
                if routing:  # the router's own decision for each prompt
                    ids, mask = batch(decoder.tokenizer)
                    path = RoutedModel(decoder.model)(ids, mask, decide=router.decider()).actions.sum(-1).tolist()
                    assert [g[0].layers_executed for g in groups] == path
                if lynx:
                    assert any(s.exited for s in out.sequences), (routing, branching, out.texts)


def test_lynx_warns_once_when_its_features_shift(model, tok):
    """Calibrated in float32 without routing: bf16 and routing each shift the features; one warning per shift."""
    import copy
    import warnings

    probe = always_exit_probe(model)
    probe.calibrated_with = {"dtype": "float32", "routing": False}
    args = dict(early_exit=True, confidence=0.9, max_new_tokens=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the calibration's own setting: no warning
        EfficientDecoder(model, tok, probe=probe).generate(PROMPTS, **args)
    decoder = EfficientDecoder(copy.deepcopy(model).to(torch.bfloat16), tok, probe=probe,
                               router=PathRouter(2, model.config.hidden_size))
    with pytest.warns(UserWarning) as caught:
        decoder.generate(PROMPTS, routing=True, **args)
        decoder.generate(PROMPTS, routing=True, **args)  # the same shift again: no second warning
    messages = [str(w.message) for w in caught if "LYNX" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "runs in bfloat16 but the probe was calibrated in float32" in messages[0]
    assert "routing is on" in messages[0] and "lynx_feature_shift.py --dtype bfloat16 --router" in messages[0]


def test_missing_parts_are_one_line_errors(model, tok):
    decoder = EfficientDecoder(model, tok)
    with pytest.raises(DecoderError, match="needs a LYNX probe"):
        decoder.generate(PROMPTS, early_exit=True)
    with pytest.raises(DecoderError, match="needs a Dr.LLM router"):
        decoder.generate(PROMPTS, routing=True)
    with pytest.raises(DecoderError, match="do_sample=True"):
        decoder.generate(PROMPTS, branching=True)
    with pytest.raises(DecoderError, match="needs a confidence"):
        EfficientDecoder(model, tok, probe=always_exit_probe(model)).generate(PROMPTS, early_exit=True)


def test_bundle_with_kept_adapter_decodes_as_the_lora_policy(tiny_model_path, tok, tmp_path):
    from peft import LoraConfig, get_peft_model

    from deploy.bundle import export_bundle

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    policy.save_pretrained(tmp_path / "adapter")
    bundle = export_bundle(str(tmp_path / "adapter"), tmp_path / "bundle", keep_adapter=True)
    decoder = EfficientDecoder.from_pretrained(str(bundle))
    ids, mask = batch(tok)
    expected = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=tok.pad_token_id)[:, ids.shape[1]:].tolist()
    got = decoder.generate(PROMPTS, max_new_tokens=6).sequences
    assert [s.token_ids for s in got] == [row[:s.num_tokens] for row, s in zip(expected, got)]


def test_batch_size_splits_and_renumbers(model, tok):
    decoder = EfficientDecoder(model, tok)
    whole = decoder.generate(PROMPTS + PROMPTS[:1], max_new_tokens=6, batch_size=1)
    single = [decoder.generate([p], max_new_tokens=6).sequences[0] for p in PROMPTS + PROMPTS[:1]]
    assert [s.token_ids for s in whole.sequences] == [s.token_ids for s in single]
    assert [s.prompt_index for s in whole.sequences] == [0, 1, 2] and whole.num_prompts == 3
    branched = decoder.generate(PROMPTS, branching=True, do_sample=True, temperature=0.9, max_new_tokens=6,
                                branch_threshold=0.5, max_branches=3, seed=0, batch_size=1)
    assert any(s.parent is not None for s in branched.sequences if s.prompt_index == 1)
    for i, s in enumerate(branched.sequences):  # parents point into the whole list, at the same prompt
        assert s.parent is None or (s.parent < i and branched.sequences[s.parent].prompt_index == s.prompt_index)
