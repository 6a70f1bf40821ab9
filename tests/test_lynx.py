"""LYNX components: cue detection, probe, split conformal calibration, export, online decoder.

CPU only, offline: a byte-level BPE tokenizer built here (merges "w a" and "i t" so that " wait"
is the tokens " ", "wa", "it"), tiny random Llamas built from a config.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from probes.conformal import ConformalCalibration, ExitRule, conformal_quantile
from probes.cues import (
    CueConfig,
    CueConfigError,
    CueDetector,
    IncrementalDetokenizer,
    cue_events_from_texts,
    cue_preset,
    default_exit_string,
    find_cue_events,
    has_thinking_block,
)
from probes.early_exit import (
    ExitPolicy,
    NeverExit,
    ProbeExitPolicy,
    _closes,
    _select,
    default_layers,
    lynx_generate,
)
from probes.export import LynxProbe, ProbeLoadError, load_probe, save_probe
from probes.probe import ExitProbe, ProbeTrainConfig, class_balanced_weights, roc_auc, train_probe

torch.set_num_threads(1)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for piece in ("wa", "it"):
        vocab[piece] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("w", "a"), ("i", "t")]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(["<eos>", "<pad>"])
    bpe.add_tokens(["</think>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")


def _tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, name: str = "") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, initializer_range=0.3, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    model.config._name_or_path = name
    return model


@pytest.fixture(scope="module")
def model(tok):
    return _tiny_llama(len(tok))


def _batch(tok, texts):
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


PROMPTS = ["Question: 12 + 30 = ?\nAnswer:", "Hmm", "Wait, what is 7 * 6? Think first."]
MAX_NEW = 40


def _plain(model, tok, ids, mask, max_new=MAX_NEW):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _frequent_cues(tok, sequences, prompt_len, k=2):
    """Cue strings that surely fire on these outputs: the texts of their most frequent tokens."""
    counts = Counter(int(t) for t in sequences[:, prompt_len:].flatten())
    texts = []
    for tid, _ in counts.most_common():
        text = tok.decode([tid])
        if tid in (tok.eos_token_id, tok.pad_token_id) or not (text.isascii() and text.strip().isalnum()):
            continue
        texts.append(text)
        if len(texts) == k:
            break
    assert texts, "the random model produced no usable token"
    return CueConfig(tuple(texts), word_boundary=False, region_end=())


def _never_exit_probe(model, layers):
    """A real probe + a calibration whose rule can never exit (5 continue scores, c = 0.9 -> q = inf)."""
    torch.manual_seed(1)
    probe = ExitProbe(len(layers) * model.config.hidden_size, (16, 8)).eval()
    calib = ConformalCalibration(safe_scores=[0.1, 0.2, 0.3], continue_scores=[0.1, 0.2, 0.3, 0.4, 0.5])
    rule = calib.rule(confidence=0.9)
    assert rule.q_continue == math.inf
    return ProbeExitPolicy(probe, rule, layers)


class ExitOnNthScore(ExitPolicy):
    """Test policy: exits at the n-th scored event overall (whichever row it belongs to)."""

    def __init__(self, layers, n):
        self.layers, self.n, self.seen = tuple(layers), n, 0

    def decide(self, features):
        idx = torch.arange(self.seen, self.seen + features.shape[0])
        self.seen += features.shape[0]
        return torch.full((features.shape[0],), 0.5), idx == self.n


# --------------------------------------------------------------------------- cues


def test_cue_completes_across_token_boundary_texts():
    # "wa" + "it": the event is the token holding the cue's last character
    assert cue_events_from_texts(["Hmm", ",", " wa", "it", " no"]) == [0, 3]
    assert cue_events_from_texts(["W", "A", "IT", "!"]) == [2]  # case-insensitive
    assert cue_events_from_texts(["Altern", "ative", "ly", " yes"]) == [2]
    # word boundary: "awaiting" and a single "waiting" token do not fire; a run of the last letter does
    assert cue_events_from_texts(["a", "wa", "iting"]) == []
    assert cue_events_from_texts([" waiting", "."]) == []
    assert cue_events_from_texts(["Hmmm", "m,"]) == [0]
    # "wait" ending exactly at a token end fires at once (the decision cannot wait)
    assert cue_events_from_texts(["wait", "ing"]) == [0]
    # without word boundary (the reference) "awaiting" fires at the "it" token
    assert cue_events_from_texts(["a", "wa", "iting"], CueConfig(word_boundary=False)) == [2]
    # a token completing two cues is one event; cues after "</think>" (split over tokens) never count
    assert cue_events_from_texts(["hmm wait", " ok </th", "ink> wait hmm"]) == [0]
    assert cue_events_from_texts(["wait</think>"]) == [0]  # the cue ends before the marker
    # configurable cue strings and the line-break preset (no thinking block: region ends at the answer)
    assert cue_events_from_texts(["so", " hm", "m"], CueConfig(("so",))) == [0]
    lb = cue_preset("linebreak", thinking=False)
    assert cue_events_from_texts(["a.", "\n", "b\n\n", "c", "\\box", "ed{1}\n"], lb) == [1, 2]
    with pytest.raises(CueConfigError):
        CueConfig(cues=())
    with pytest.raises(CueConfigError):
        cue_preset("nope", thinking=True)


def test_cue_detection_on_token_ids(tok):
    text = "Hmm, let me see. wait. Alternatively x</think> wait hmm"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert "wa" in pieces and "it" in pieces  # " wait" really is split over tokens
    events = find_cue_events(tok, ids)
    assert [pieces[i] for i in events] == ["m", "it", "y"]  # Hmm, w-a-it, alternatively
    assert pieces[events[1] - 1] == "wa"
    # the detokenizer's deltas rebuild the text, a two-byte character arriving with its 2nd byte
    detok = IncrementalDetokenizer(tok)
    ids2 = tok("é wait", add_special_tokens=False)["input_ids"]
    deltas = [detok.push(t) for t in ids2]
    assert deltas[0] == "" and deltas[1] == "é" and "".join(deltas) == "é wait"
    assert has_thinking_block(tok)
    assert default_exit_string(True).startswith("</think>")


def test_detector_stops_for_good_after_region_end():
    det = CueDetector(CueConfig(region_end=("</think>",)))
    assert det.push("wait") and det.active
    assert not det.push("</think>") and not det.active
    assert not det.push(" wait")


# --------------------------------------------------------------------------- probe


def test_roc_auc_hand_examples():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(0.5)  # ties count 1/2
    assert roc_auc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_class_balanced_weights():
    w_neg, w_pos = class_balanced_weights(torch.tensor([1, 0, 0, 0.0]))
    assert (w_neg, w_pos) == pytest.approx((4 / 6, 2.0))  # w_c = n / (2 n_c)


def test_probe_trains_and_standardises():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 8
    y = (torch.rand(n, generator=g) < 0.3).float()  # imbalanced
    x = torch.randn(n, d, generator=g) * 5 + 100  # far from standard scale
    x[:, 0] += 15 * y  # one informative direction: the oracle AUC is about Phi(15 / (5 sqrt 2)) = 0.98
    probe, metrics = train_probe(x, y, ProbeTrainConfig(seed=0))
    assert metrics["val_auc"] > 0.93 and metrics["train_auc"] > 0.93
    assert 1 <= metrics["best_epoch"] <= metrics["epochs"] <= 500
    assert metrics["num_val"] == pytest.approx(0.2 * n, abs=2)
    assert torch.allclose(probe.mean[1:], torch.full((d - 1,), 100.0), atol=1.5)  # stored in the module
    assert "mean" in probe.state_dict() and "std" in probe.state_dict()
    p = probe.predict_proba(x)
    assert p.shape == (n,) and bool(((p >= 0) & (p <= 1)).all())
    with pytest.raises(ValueError, match="both labels"):
        train_probe(x[:10], torch.ones(10))


# --------------------------------------------------------------------------- conformal


def test_conformal_thresholds_hand_computed():
    cont = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # n = 9
    assert conformal_quantile(cont, 0.2) == 0.8  # k = ceil(10 * 0.8) = 8
    assert conformal_quantile(cont, 0.1) == 0.9  # k = ceil(10 * 0.9) = 9
    assert conformal_quantile(cont, 0.05) == math.inf  # k = ceil(9.5) = 10 > 9
    assert conformal_quantile([i / 100 for i in range(1, 100)], 0.1) == 0.90  # k = 90, not 91 (float noise)
    # p of 5 safe events -> scores 1 - p = .05 .1 .2 .3 .4; p of 9 continue events -> scores p = .1 .. .9
    probs = [0.95, 0.9, 0.8, 0.7, 0.6] + cont
    labels = [1] * 5 + [0] * 9
    calib = ConformalCalibration.from_probs(probs, labels)
    assert calib.sizes == (5, 9)
    rule = calib.rule(confidence=0.8)  # delta 0.2: safe k = ceil(6 * .8) = 5 -> 0.4; continue -> 0.8
    assert rule.q_safe == pytest.approx(0.4) and rule.q_continue == pytest.approx(0.8)
    has_safe, has_cont = rule.prediction_set(torch.tensor([0.85, 0.7, 0.5]))
    assert has_safe.tolist() == [True, True, False] and has_cont.tolist() == [False, True, True]
    assert rule.should_exit(torch.tensor([0.85, 0.7, 0.5, 0.61])).tolist() == [True, False, False, False]
    # higher confidence can only exit less; beyond n0/(n0+1) it never exits
    assert calib.rule(delta=0.1).q_continue == pytest.approx(0.9)
    assert not bool(calib.rule(confidence=0.95).should_exit(torch.tensor([0.999])).any())
    assert calib.max_confidence() == pytest.approx(0.9)
    with pytest.raises(ValueError):
        calib.rule(confidence=1.0)
    assert ExitRule(0.1, 0.4, 0.8)(torch.tensor(0.9)).item()


@pytest.mark.parametrize("delta", [0.03, 0.1, 0.2])
def test_premature_exit_rate_held_out_is_at_most_delta(delta):
    """Random splits of a fixed pool: calibration and held-out events are exchangeable, so the held-out
    rate of exits among 'continue' events (premature exits) is <= delta in expectation over splits."""
    rng = np.random.default_rng(0)
    n_neg, n_pos = 400, 400
    p_neg = rng.beta(2, 4, n_neg)  # probe scores of events where exiting is wrong
    p_pos = rng.beta(4, 2, n_pos)
    splits, rates, miss, exit_rates = 400, [], [], []
    for _ in range(splits):
        neg, pos = rng.permutation(p_neg), rng.permutation(p_pos)
        calib = ConformalCalibration.from_probs(np.r_[pos[:200], neg[:200]], [1] * 200 + [0] * 200)
        rule = calib.rule(delta=delta)
        rates.append(rule.should_exit(torch.from_numpy(neg[200:])).double().mean().item())
        miss.append((~rule.prediction_set(torch.from_numpy(neg[200:]))[1]).double().mean().item())
        exit_rates.append(rule.should_exit(torch.from_numpy(pos[200:])).double().mean().item())
    rates = np.array(rates)
    n_cal = n_test = 200
    sd_one = math.sqrt(delta * (1 - delta) * (1 / n_cal + 1 / n_test))  # one split's spread
    mc_slack = 4 * sd_one / math.sqrt(splits)
    assert rates.mean() <= delta + mc_slack
    # the bound is tight for its own event: "continue" leaves the set at rate in [delta - 1/(n+1), delta]
    assert delta - 1 / (n_cal + 1) - mc_slack <= np.mean(miss) <= delta + mc_slack
    assert np.quantile(rates, 0.95) <= delta + 2 * sd_one  # per-split finite-sample slack
    assert np.mean(exit_rates) > 0.2  # safe events do exit


# --------------------------------------------------------------------------- export


def _bundle(model, layers=(1, 2)):
    torch.manual_seed(0)
    probe = ExitProbe(len(layers) * model.config.hidden_size, (16, 8))
    probe.set_standardisation(torch.randn(50, probe.input_dim) * 3 + 1)
    calib = ConformalCalibration.from_probs(torch.rand(60), torch.arange(60) % 2)
    from algos.fingerprint import base_identity

    return LynxProbe(probe=probe.eval(), calibration=calib, layers=layers, cue_config=cue_preset("words", True),
                     exit_string=default_exit_string(True), base_model=base_identity(model),
                     default_confidence=0.9, metrics={"val_auc": 0.71, "nan_ok": float("nan")})


def test_export_round_trip(tmp_path, model):
    bundle = _bundle(model)
    out = save_probe(tmp_path / "lynx", bundle)
    assert sorted(p.name for p in out.iterdir()) == ["lynx_probe.json", "probe.safetensors"]
    save_probe(tmp_path / "lynx", bundle)  # overwriting an export works and leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lynx"]
    loaded = load_probe(out, model=model)
    for k, v in bundle.probe.state_dict().items():
        assert torch.equal(loaded.probe.state_dict()[k], v)
    x = torch.randn(7, bundle.probe.input_dim)
    assert torch.equal(loaded.score(x), bundle.score(x))
    assert np.array_equal(loaded.calibration.safe_scores, bundle.calibration.safe_scores)
    assert np.array_equal(loaded.calibration.continue_scores, bundle.calibration.continue_scores)
    assert loaded.rule(0.8) == bundle.rule(0.8) and loaded.rule() == bundle.rule(0.9)
    assert loaded.layers == (1, 2) and loaded.cue_config == bundle.cue_config
    assert loaded.exit_string == bundle.exit_string and loaded.answer_max_tokens == 64
    assert loaded.base_model == bundle.base_model and loaded.metrics["val_auc"] == 0.71


def test_wrong_model_load_error(tmp_path, tok, model):
    out = save_probe(tmp_path / "lynx", _bundle(model))
    other = _tiny_llama(len(tok), hidden=48)
    with pytest.raises(ProbeLoadError, match="hidden_size 32 != 48") as err:
        load_probe(out, model=other)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)
    # same architecture, other name: refused unless told it is the same weights
    named = _tiny_llama(len(tok), name="org/model-a")
    out2 = save_probe(tmp_path / "named", _bundle(named))
    with pytest.raises(ProbeLoadError, match="name 'org/model-a' != 'org/model-b'"):
        load_probe(out2, model=_tiny_llama(len(tok), name="org/model-b"))
    load_probe(out2, model=_tiny_llama(len(tok), name="org/model-b"), check_name=False)
    with pytest.raises(ProbeLoadError, match="no LYNX probe"):
        load_probe(tmp_path / "missing")
    with pytest.raises(ProbeLoadError, match="another model"):  # the decoder checks too
        lynx_generate(other, tok, torch.tensor([[5, 6]]), probe=load_probe(out), confidence=0.9)


# --------------------------------------------------------------------------- online decoder


def test_default_layers():
    assert default_layers(28) == (9, 19, 28)
    assert default_layers(30) == (10, 20, 30)
    assert default_layers(2) == (1, 2)


@pytest.mark.parametrize("batch", [1, 3])
def test_never_exit_matches_plain_generate(tok, model, batch):
    ids, mask = _batch(tok, PROMPTS[:batch])
    plain = _plain(model, tok, ids, mask)
    cues = _frequent_cues(tok, plain, ids.shape[1])
    policy = _never_exit_probe(model, default_layers(model.config.num_hidden_layers))
    out = lynx_generate(model, tok, ids, mask, policy=policy, cue_config=cues, exit_string=default_exit_string(True),
                        max_new_tokens=MAX_NEW, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert out.sequences.shape == plain.shape
    assert torch.equal(out.sequences, plain)
    assert sum(s.num_events for s in out.stats) > 0  # the probe really was consulted
    assert all(not s.exited and s.tokens_saved == 0 for s in out.stats)
    assert all(all(0 <= v <= 1 for v in s.event_scores) for s in out.stats)
    # the decoder's events are the offline scan's events
    for b, s in enumerate(out.stats):
        response = [t for t in out.sequences[b, ids.shape[1]:].tolist() if t != tok.pad_token_id]
        if response and response[-1] == tok.eos_token_id:
            response = response[:-1]
        assert s.event_indices == [i for i in find_cue_events(tok, response, cues) if i < len(response)]


@pytest.mark.parametrize("synthetic", [False, True])
def test_recorded_features_are_the_hidden_states_at_cue_tokens(tok, model, synthetic):
    """Collection mode: features recorded during generation equal a full forward pass's hidden states
    at the event tokens; with no cue at all, one synthetic event at 70% of the length."""
    ids, mask = _batch(tok, PROMPTS)
    plain = _plain(model, tok, ids, mask)
    cues = CueConfig(("no such cue",), region_end=()) if synthetic else _frequent_cues(tok, plain, ids.shape[1])
    layers = (1, 2)
    out = lynx_generate(model, tok, ids, mask, policy=NeverExit(layers), cue_config=cues, max_new_tokens=MAX_NEW,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, record_features=True,
                        synthetic_event_at=0.7)
    assert torch.equal(out.sequences, plain)
    for b, s in enumerate(out.stats):
        assert s.synthetic_event == synthetic
        if synthetic:
            n_think = sum(1 for t in plain[b, ids.shape[1]:].tolist() if t not in (tok.pad_token_id, tok.eos_token_id))
            assert s.event_indices == [int(0.7 * n_think)]
    full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1]:])], dim=1)
    pos = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        hs = model(out.sequences, attention_mask=full_mask, position_ids=pos, output_hidden_states=True).hidden_states
    checked = 0
    for b, s in enumerate(out.stats):
        assert out.features[b].shape == (s.num_events, 2 * model.config.hidden_size)
        for j, i in enumerate(s.event_indices):
            ref = torch.cat([hs[layer][b, ids.shape[1] + i] for layer in layers])
            torch.testing.assert_close(out.features[b][j], ref, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("batch,nth", [(1, 0), (3, 0), (3, 2)])
def test_exit_rolls_back_cue_and_answers(tok, model, batch, nth):
    ids, mask = _batch(tok, PROMPTS[:batch])
    plain = _plain(model, tok, ids, mask)
    prompt_len = ids.shape[1]
    cues = _frequent_cues(tok, plain, prompt_len)
    exit_string = "</think> Final Answer: \\boxed{"
    exit_ids = tok(exit_string, add_special_tokens=False)["input_ids"]
    answer_max = 12
    out = lynx_generate(model, tok, ids, mask, policy=ExitOnNthScore((1, 2), nth), cue_config=cues,
                        exit_string=exit_string, max_new_tokens=MAX_NEW, answer_max_tokens=answer_max,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    exited = [b for b, s in enumerate(out.stats) if s.exited]
    assert len(exited) == 1
    for b, s in enumerate(out.stats):
        got = out.sequences[b, prompt_len:].tolist()
        if b not in exited:  # untouched rows: exactly plain generate
            plain_b = plain[b, prompt_len:].tolist()
            assert got[:len(plain_b)] == plain_b and all(t == tok.pad_token_id for t in got[len(plain_b):])
            continue
        k = s.exit_index
        assert k in s.event_indices
        thinking = plain[b, prompt_len:prompt_len + k].tolist()  # tokens before the cue token
        assert got[:k] == thinking
        assert got[k:k + len(exit_ids)] == exit_ids  # the cue token was rolled back
        # the answer equals greedy decoding from scratch on prompt + thinking + exit string
        prompt_b = ids[b][mask[b].bool()].tolist()
        ref_in = torch.tensor([prompt_b + thinking + exit_ids])
        ref = _plain(model, tok, ref_in, torch.ones_like(ref_in), max_new=answer_max)[0, ref_in.shape[1]:].tolist()
        if tok.eos_token_id in ref:
            ref = ref[:ref.index(tok.eos_token_id) + 1]
        answer = got[k + len(exit_ids):k + len(exit_ids) + len(ref)]
        assert answer == ref
        assert s.answer_tokens == len(ref) and s.new_tokens == k + len(exit_ids) + len(ref)
        assert s.tokens_saved == max(0, MAX_NEW - s.new_tokens)
        assert out.sequences[b, prompt_len + s.new_tokens:].eq(tok.pad_token_id).all()


def test_sampled_exit_arm_follows_the_no_exit_trajectory_until_its_exit(tok, model):
    # probes.evaluate's sampled arms share seeds: one draw per row per step whatever the rows do
    ids, mask = _batch(tok, PROMPTS)
    kwargs = dict(max_new_tokens=MAX_NEW, do_sample=True, temperature=0.8, top_p=0.95,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    prompt_len = ids.shape[1]
    plain = lynx_generate(model, tok, ids, mask, generator=torch.Generator().manual_seed(5), **kwargs)
    cues = _frequent_cues(tok, plain.sequences, prompt_len)
    out = lynx_generate(model, tok, ids, mask, policy=ExitOnNthScore((1, 2), 1), cue_config=cues,
                        exit_string="</think> Final Answer: \\boxed{", answer_max_tokens=4,
                        generator=torch.Generator().manual_seed(5), **kwargs)
    exited = [b for b, st in enumerate(out.stats) if st.exited]
    assert len(exited) == 1
    for b, st in enumerate(out.stats):
        got, ref = out.sequences[b, prompt_len:].tolist(), plain.sequences[b, prompt_len:].tolist()
        if b in exited:
            assert got[:st.exit_index] == ref[:st.exit_index]
        else:  # the other rows' samples do not move when one row exits
            assert got[:plain.stats[b].new_tokens] == ref[:plain.stats[b].new_tokens]


def test_sampling_paths(tok, model):
    logits = torch.randn(4, 50)
    assert torch.equal(_select(logits, True, 1.0, 1, 1.0, None), logits.argmax(-1))  # top-k = 1
    assert torch.equal(_select(logits, True, 1.0, 0, 1e-9, None), logits.argmax(-1))  # tiny top-p
    ids, mask = _batch(tok, PROMPTS)
    g = torch.Generator().manual_seed(0)
    out = lynx_generate(model, tok, ids, mask, max_new_tokens=10, do_sample=True, temperature=0.6, top_p=0.95,
                        generator=g, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert out.sequences.shape[0] == 3 and out.sequences.shape[1] <= ids.shape[1] + 10
    with pytest.raises(ValueError, match="record_features"):
        lynx_generate(model, tok, ids, mask, record_features=True)
    with pytest.raises(ValueError, match="layers"):
        lynx_generate(model, tok, ids, mask, policy=NeverExit((5,)), record_features=True)


def test_answer_close_tracking(tok):
    depth = [1]
    ids = tok("12{3}}", add_special_tokens=False)["input_ids"]
    closed = [_closes(tok, t, depth, 0) for t in ids]
    assert closed == [False, False, False, False, False, True]  # "{3}" nests, the last "}" closes \boxed{


def test_bootstrap_interval_resamples_problems_not_events():
    from probes.evaluate import bootstrap_rate_interval

    # one problem: every resample is that problem, so the interval is the point rate
    assert bootstrap_rate_interval(torch.tensor([1, 0, 0, 1]), torch.zeros(4, dtype=torch.long)) == (0.5, 0.5)
    # two problems, 1 event all exits vs 9 events none: a resample is {A,A}, {A,B} or {B,B}, so the
    # rate is 1, 0.1 or 0; by problems the interval spans [0, 1] (by events it would sit near 0.1)
    hits = torch.tensor([1] + [0] * 9)
    groups = torch.tensor([0] + [1] * 9)
    lo, hi = bootstrap_rate_interval(hits, groups)
    assert lo == 0.0 and hi == 1.0
    assert all(math.isnan(x) for x in bootstrap_rate_interval(torch.zeros(0), torch.zeros(0, dtype=torch.long)))
