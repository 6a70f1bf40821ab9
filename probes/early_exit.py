"""Online LYNX early exit: KV-cached generation with the exit probe attached.

LYNX (arXiv 2512.05325) simulates exits offline on finished rollouts; this decoder does it while
generating, per sequence inside a batch:

1. Each step feeds one token per row through an HF causal LM with a KV cache. Every sampled token
   goes through the cue detector (:mod:`probes.cues`), so the decoder knows *before* feeding a
   token whether it completes a cue inside the thinking region; only for such steps does the
   forward pass return hidden states (``output_hidden_states``), so steps without cues cost what
   plain generation costs.
2. After the forward pass of a cue-completing token, its hidden states at ``policy.layers`` (HF
   ``hidden_states`` indices, concatenated) are scored; the policy says exit or continue.
3. On exit the cue token is rolled back: with one row the cache is cropped by one entry
   (``DynamicCache.crop(-1)``); in a batch the row's slot is masked out of the attention mask and
   the row's next position reuses the cue token's position, which is the same computation (a
   masked key contributes nothing and RoPE sees contiguous positions). The exit string's tokens
   are then fed one per step (forced), and the answer is decoded greedily for at most
   ``answer_max_tokens`` tokens (reference: 64) or until EOS; with ``stop_at_answer_close`` also
   as soon as the braces the exit string opened (``\boxed{``) are closed.

Without exits the steps are exactly those of ``model.generate`` (same position ids, mask, cache
and ``logits_to_keep=1``), so greedy outputs match plain ``generate`` token for token.

Statistics per sequence: exited?, the exit index (index of the rolled-back cue token in the
response, i.e. thinking tokens kept), the cue events and their probe scores, new tokens, and
``tokens_saved`` = ``max_new_tokens - new_tokens`` for exited rows, an upper bound on the saving
(the row would otherwise have run until EOS or the budget; the true saving needs the full rollout).

Limits: models whose every layer keeps a per-token KV cache (dense or sliding-window attention);
no beam search; logits processors from ``generation_config`` (repetition penalty, ...) are not
applied: pass sampling settings as arguments.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field, replace

import torch

from algos.hf_compat import cache_arg, output_cache
from probes.cues import CueConfig, CueDetector, IncrementalDetokenizer

THINK, FORCED, ANSWER, DONE = range(4)


def default_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """HF ``hidden_states`` indices at about 1/3 and 2/3 depth and the last (after the final
    norm), deduplicated; 28 layers -> (9, 19, 28) (the reference uses 9, 16, 28)."""
    n = int(num_hidden_layers)
    picks = [max(1, round(n / 3)), max(1, round(2 * n / 3)), n]
    return tuple(dict.fromkeys(picks))


class ExitPolicy:
    """Decides at cue events. ``layers``: hidden-state indices the features are built from;
    ``decide(features (N, D)) -> (scores (N,), exit (N,) bool)``."""

    layers: tuple[int, ...] = ()

    def decide(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class NeverExit(ExitPolicy):
    """Never exits; with ``layers`` set and ``record_features`` on, the decoder still collects the
    cue-event features (what data collection needs). Scores are NaN."""

    def __init__(self, layers: tuple[int, ...] = ()):
        self.layers = tuple(layers)

    def decide(self, features):
        n = features.shape[0]
        return torch.full((n,), float("nan")), torch.zeros(n, dtype=torch.bool)


class ProbeExitPolicy(ExitPolicy):
    """The LYNX rule: p = probe(features); exit iff the conformal prediction set is {safe}."""

    def __init__(self, probe, rule, layers: tuple[int, ...]):
        if not layers:
            raise ValueError("a probe policy needs the hidden-state layers its features come from")
        self.probe, self.rule, self.layers = probe, rule, tuple(layers)

    @classmethod
    def from_bundle(cls, bundle, confidence: float | None = None, device=None) -> "ProbeExitPolicy":
        """From a loaded :class:`probes.export.LynxProbe` at confidence c = 1 - delta; the probe moves
        to ``device`` (the model's), so hidden states are scored where they are."""
        if device is not None:
            bundle.probe.to(device)
        return cls(bundle.probe, bundle.rule(confidence), bundle.layers)

    @torch.no_grad()
    def decide(self, features):
        p = self.probe.predict_proba(features).float().cpu()
        return p, self.rule.should_exit(p)


@dataclass
class SequenceStats:
    exited: bool = False
    exit_index: int | None = None  # response index of the rolled-back cue token = thinking tokens kept
    event_indices: list[int] = field(default_factory=list)  # response index of each cue-completing token
    event_scores: list[float] = field(default_factory=list)
    new_tokens: int = 0  # generated tokens in the output (exit string and answer included)
    answer_tokens: int = 0  # tokens decoded after the exit string
    tokens_saved: int = 0  # exited rows: max_new_tokens - new_tokens (an upper bound)
    synthetic_event: bool = False  # the only event is the synthetic one (no cue in the response)
    finish_reason: str = "length"  # "eos", "length", "answer_length", "answer_closed"

    @property
    def num_events(self) -> int:
        return len(self.event_indices)


@dataclass
class LynxGenerateOutput:
    """``sequences`` like ``generate``: (B, prompt + longest response), pad after each row's end."""

    sequences: torch.Tensor
    stats: list[SequenceStats]
    features: list[torch.Tensor] | None = None  # per row (num_events, D) when record_features
    # the KV cache at the end and the attention mask it was built with ((B, cache length); slot j
    # after the prompt holds the token fed at step j, i.e. ``sequences[:, prompt_len + j]``):
    # data collection decodes its forced exits from it instead of re-running the prefixes
    past_key_values: object = None
    attention_mask: torch.Tensor | None = None


def _select(logits, do_sample, temperature, top_k, top_p, generator):
    """Next tokens (B,) from float32 logits: argmax, or sampling after temperature, top-k, top-p."""
    if not do_sample:
        return torch.argmax(logits, dim=-1)
    scores = logits / max(float(temperature), 1e-6)
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_probe_fits(layers, probe_dim: int | None, num_layers: int, hidden_size: int) -> None:
    """ValueError (one line) unless the hidden-state ``layers`` exist and give ``probe_dim`` features."""
    if any(not 0 <= layer <= num_layers for layer in layers):
        raise ValueError(f"probe layers {tuple(layers)} out of range for a model with {num_layers} layers")
    if probe_dim is not None and probe_dim != len(layers) * hidden_size:
        raise ValueError(f"the probe takes {probe_dim} features but {len(layers)} layers of this model "
                         f"give {len(layers) * hidden_size}; use the probe's own model")


def _closes(tokenizer, token_id: int, depth: list[int], row: int) -> bool:
    """Track the brace depth of a row's answer; True once the exit string's braces are closed."""
    for ch in tokenizer.decode([token_id], skip_special_tokens=True):
        depth[row] += (ch == "{") - (ch == "}")
        if depth[row] <= 0:
            return True
    return False


def _token_set(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple, set)):
        return {int(v) for v in value}
    return {int(value)}


@torch.no_grad()
def lynx_generate(model, tokenizer, input_ids, attention_mask=None, *, policy: ExitPolicy | None = None,
                  probe=None, confidence: float | None = None, cue_config: CueConfig | None = None,
                  exit_string: str | None = None, max_new_tokens: int = 256, answer_max_tokens: int | None = None,
                  do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  eos_token_id=None, pad_token_id: int | None = None, generator: torch.Generator | None = None,
                  record_features: bool = False, stop_at_answer_close: bool = False,
                  synthetic_event_at: float | None = None) -> LynxGenerateOutput:
    """Generate with LYNX early exits (see the module docstring).

    ``probe`` (a :class:`probes.export.LynxProbe`) with ``confidence`` builds the policy and gives the
    defaults for ``cue_config``, ``exit_string`` and ``answer_max_tokens``; or pass ``policy``
    directly (default: :class:`NeverExit`, i.e. plain generation with cue statistics).
    ``input_ids`` / ``attention_mask``: left-padded prompts, as for ``generate``.
    ``record_features``: return each event's features (what data collection needs).
    ``synthetic_event_at`` (collection, e.g. 0.7): a row that ends without any cue event gets one
    synthetic event at that fraction of its thinking length (reference); its hidden states are kept
    while a row has no event yet, so they too come from the generation's own forward passes.
    """
    if probe is not None:
        from probes.export import check_compatible

        check_compatible(probe.base_model, model, where="the probe", check_name=False)
        if policy is None:
            policy = ProbeExitPolicy.from_bundle(probe, confidence, device=next(model.parameters()).device)
        cue_config = cue_config or probe.cue_config
        exit_string = probe.exit_string if exit_string is None else exit_string
        answer_max_tokens = probe.answer_max_tokens if answer_max_tokens is None else answer_max_tokens
    policy = policy or NeverExit()
    cue_config = cue_config or CueConfig()
    answer_max_tokens = 64 if answer_max_tokens is None else int(answer_max_tokens)
    open_braces = (exit_string or "").count("{") - (exit_string or "").count("}")
    if record_features and not policy.layers:
        raise ValueError("record_features needs the policy's layers, e.g. NeverExit(default_layers(n_layers))")
    need_features = bool(policy.layers) and (not isinstance(policy, NeverExit) or record_features)
    exit_ids = tokenizer(exit_string or "", add_special_tokens=False)["input_ids"] if exit_string else []
    if not isinstance(policy, NeverExit) and not exit_ids:
        raise ValueError("an exit policy needs a non-empty exit_string (e.g. '</think> Final Answer: \\boxed{')")
    check_probe_fits(policy.layers, getattr(getattr(policy, "probe", None), "input_dim", None),
                     model.config.num_hidden_layers, model.config.hidden_size)

    device = next(model.parameters()).device
    input_ids = torch.as_tensor(input_ids, device=device)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    batch, prompt_len = input_ids.shape
    close_depth = [open_braces] * batch if stop_at_answer_close and open_braces > 0 else None
    attn = (torch.ones_like(input_ids) if attention_mask is None
            else torch.as_tensor(attention_mask, device=device).to(torch.long))
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    eos = _token_set(eos_token_id if eos_token_id is not None else tokenizer.eos_token_id)
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    phase = [THINK] * batch
    responses: list[list[int]] = [[] for _ in range(batch)]
    queues: list[list[int]] = [[] for _ in range(batch)]
    stats = [SequenceStats() for _ in range(batch)]
    feats: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    detoks = [IncrementalDetokenizer(tokenizer) for _ in range(batch)]
    detectors = [CueDetector(cue_config) for _ in range(batch)]
    pending = [False] * batch  # the token fed in the next forward completes a cue
    buffering = synthetic_event_at is not None and need_features
    buffers: list[dict[int, torch.Tensor]] = [{} for _ in range(batch)]  # response index -> features
    region_end = [None] * batch  # response index of the token that ended the thinking region
    fed_think = [False] * batch
    mask_needed = not bool((attn == 1).all())  # as generate: no mask at all without padding

    # prefill, exactly as generate prepares it
    position_ids = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
    out = model(input_ids=input_ids, attention_mask=attn if mask_needed else None, position_ids=position_ids,
                use_cache=True, **extra)
    cache = output_cache(out)
    next_pos = position_ids[:, -1] + 1
    logits = out.logits[:, -1].to(torch.float32)

    while True:
        # 1. score the cue tokens fed in the last forward; exit -> roll back, queue the exit string
        rows = [b for b in range(batch) if pending[b]]
        if rows:
            hidden = torch.zeros((len(rows), 0))
            if need_features:
                hidden = torch.cat([out.hidden_states[layer][rows, -1] for layer in policy.layers], dim=-1).float()
            if isinstance(policy, NeverExit):
                scores, exits = [float("nan")] * len(rows), [False] * len(rows)
            else:
                scores, exits = policy.decide(hidden)
                scores, exits = torch.as_tensor(scores).tolist(), torch.as_tensor(exits).tolist()
            for j, b in enumerate(rows):
                pending[b] = False
                buffers[b].clear()
                stats[b].event_indices.append(len(responses[b]) - 1)
                stats[b].event_scores.append(float(scores[j]))
                if record_features:
                    feats[b].append(hidden[j].cpu())
                if exits[j]:
                    stats[b].exited, stats[b].exit_index = True, len(responses[b]) - 1
                    responses[b].pop()
                    if batch == 1:
                        cache.crop(-1)
                        attn = attn[:, :-1]
                    else:
                        attn[b, -1] = 0
                        mask_needed = True
                    next_pos[b] -= 1
                    phase[b], queues[b] = FORCED, list(exit_ids)

        # 2. the next token of every row
        sampled = _select(logits, do_sample, temperature, top_k, top_p, generator).tolist()
        greedy = None
        tokens = [pad_token_id] * batch
        for b in range(batch):
            if phase[b] == DONE:
                fed_think[b] = False
                continue
            if phase[b] == FORCED:
                fed_think[b] = False
                tok = queues[b].pop(0)
                if not queues[b]:
                    phase[b] = ANSWER
                responses[b].append(tok)
                tokens[b] = tok
                continue
            if phase[b] == ANSWER and do_sample:  # answers are always greedy (reference)
                if greedy is None:
                    greedy = torch.argmax(logits, dim=-1).tolist()
                tok = greedy[b]
            else:
                tok = sampled[b]
            responses[b].append(tok)
            tokens[b] = tok
            if phase[b] == ANSWER:
                stats[b].answer_tokens += 1
            if tok in eos:
                phase[b], stats[b].finish_reason = DONE, "eos"
            elif phase[b] == ANSWER and stats[b].answer_tokens >= answer_max_tokens:
                phase[b], stats[b].finish_reason = DONE, "answer_length"
            elif phase[b] == ANSWER and close_depth is not None and _closes(tokenizer, tok, close_depth, b):
                phase[b], stats[b].finish_reason = DONE, "answer_closed"
            elif phase[b] == THINK and len(responses[b]) >= max_new_tokens:
                phase[b], stats[b].finish_reason = DONE, "length"
            elif phase[b] == THINK and detectors[b].push(detoks[b].push(tok)):
                pending[b] = True
            if phase[b] == THINK and not detectors[b].active and region_end[b] is None:
                region_end[b] = len(responses[b]) - 1
            fed_think[b] = phase[b] == THINK
        if all(p == DONE for p in phase):
            break

        # 3. feed them (finished rows get padding, as in generate)
        step = torch.tensor(tokens, device=device)[:, None]
        attn = torch.cat([attn, attn.new_ones((batch, 1))], dim=-1)
        keep = [b for b in range(batch) if buffering and fed_think[b] and not pending[b]
                and not stats[b].event_indices and detectors[b].active]
        want_hidden = need_features and (any(pending) or bool(keep))
        out = model(input_ids=step, attention_mask=attn if mask_needed else None,
                    position_ids=next_pos[:, None].clone(), **cache_arg(cache), use_cache=True,
                    output_hidden_states=want_hidden, **extra)
        cache = output_cache(out)
        next_pos = next_pos + 1
        logits = out.logits[:, -1].to(torch.float32)
        if keep:
            kept = torch.cat([out.hidden_states[layer][keep, -1] for layer in policy.layers], dim=-1).float()
            for j, b in enumerate(keep):
                buffers[b][len(responses[b]) - 1] = kept[j].cpu()

    if synthetic_event_at is not None:
        for b in range(batch):
            if stats[b].event_indices:
                continue
            r = responses[b]
            think_len = region_end[b] if region_end[b] is not None else len(r) - (1 if r and r[-1] in eos else 0)
            i = int(synthetic_event_at * think_len)
            if think_len <= 0 or (record_features and i not in buffers[b]):
                continue
            stats[b].event_indices, stats[b].event_scores, stats[b].synthetic_event = [i], [float("nan")], True
            if record_features:
                feats[b].append(buffers[b][i])

    width = max(len(r) for r in responses)
    gen = torch.full((batch, width), pad_token_id, dtype=input_ids.dtype, device=device)
    for b, r in enumerate(responses):
        if r:
            gen[b, :len(r)] = torch.tensor(r, dtype=input_ids.dtype, device=device)
        stats[b].new_tokens = len(r)
        if stats[b].exited:
            stats[b].tokens_saved = max(0, max_new_tokens - len(r))
    features = None
    if record_features:
        dim = sum(model.config.hidden_size for _ in policy.layers)
        features = [torch.stack(f) if f else torch.zeros((0, dim)) for f in feats]
    return LynxGenerateOutput(torch.cat([input_ids, gen], dim=-1), stats, features, cache, attn)


@dataclass
class ExitState:
    """One sequence's LYNX state inside a decoder that manages its own rows (EAGER)."""

    detokenizer: IncrementalDetokenizer
    detector: CueDetector
    phase: int = THINK
    pending: bool = False           # the token fed last completes a cue: score it after the forward
    queue: list[int] = field(default_factory=list)  # exit-string tokens still to feed
    answer_tokens: int = 0
    brace_depth: list[int] = field(default_factory=lambda: [0])
    scores: list[float] = field(default_factory=list)


class ExitController:
    """LYNX exits for decoding loops that own their rows (``algos.rollout.eager.eager_generate``).

    The same rule as :func:`lynx_generate`: a cue-completing token's hidden states at the probe's
    layers are scored after its forward pass; on exit the loop rolls that token back (masks its
    cache slot), feeds the exit string (:meth:`next_token` returns it token by token), then decodes
    the answer greedily for at most ``answer_max_tokens`` tokens or until the exit string's braces
    close. States are copied when a sequence forks (:meth:`fork`)."""

    def __init__(self, tokenizer, probe, num_layers: int, hidden_size: int, confidence: float | None = None,
                 answer_max_tokens: int | None = None, stop_at_answer_close: bool = True, device=None):
        self.tokenizer = tokenizer
        self.policy = ProbeExitPolicy.from_bundle(probe, confidence, device=device)
        self.layers = self.policy.layers
        check_probe_fits(self.layers, probe.probe.input_dim, num_layers, hidden_size)
        self.cue_config = probe.cue_config
        self.exit_ids = tokenizer(probe.exit_string, add_special_tokens=False)["input_ids"]
        if not self.exit_ids:
            raise ValueError("the probe's exit_string is empty")
        self.answer_max_tokens = int(probe.answer_max_tokens if answer_max_tokens is None else answer_max_tokens)
        self.open_braces = probe.exit_string.count("{") - probe.exit_string.count("}")
        self.stop_at_answer_close = stop_at_answer_close and self.open_braces > 0
        self.extra_tokens = len(self.exit_ids) + self.answer_max_tokens  # beyond the thinking budget

    def new_state(self) -> ExitState:
        return ExitState(IncrementalDetokenizer(self.tokenizer), CueDetector(self.cue_config))

    @staticmethod
    def fork(state: ExitState) -> ExitState:
        """An independent copy that shares the tokenizer and cue settings (a deep copy would copy the tokenizer)."""
        detokenizer = copy.copy(state.detokenizer)
        detokenizer.ids = list(detokenizer.ids)
        return replace(state, detokenizer=detokenizer, detector=copy.copy(state.detector), queue=list(state.queue),
                       brace_depth=list(state.brace_depth), scores=list(state.scores))

    @staticmethod
    def thinking(state: ExitState) -> bool:
        return state.phase == THINK

    def decide(self, states: list[ExitState], features: torch.Tensor) -> list[bool]:
        """Score the pending cue events (features (N, D)); exiting states switch to the exit string."""
        scores, exits = self.policy.decide(features)
        decisions = []
        for state, score, leave in zip(states, torch.as_tensor(scores).tolist(), torch.as_tensor(exits).tolist()):
            state.pending = False
            state.scores.append(float(score))
            if leave:
                state.phase, state.queue = FORCED, list(self.exit_ids)
                state.brace_depth = [self.open_braces]
            decisions.append(bool(leave))
        return decisions

    @staticmethod
    def next_token(state: ExitState, sampled: int, greedy: int) -> tuple[int, bool]:
        """(token, forced): the exit string's next token, else a greedy answer token, else ``sampled``."""
        if state.phase == FORCED:
            token = state.queue.pop(0)
            if not state.queue:
                state.phase = ANSWER
            return token, True
        return (greedy if state.phase == ANSWER else sampled), False

    def push(self, state: ExitState, token: int, forced: bool) -> str | None:
        """Account for a token appended to the sequence; a finish reason when the answer is done."""
        if state.phase == THINK:
            state.pending = state.detector.push(state.detokenizer.push(token))
            return None
        if forced or state.phase != ANSWER:
            return None
        state.answer_tokens += 1
        if state.answer_tokens >= self.answer_max_tokens:
            return "answer_length"
        if self.stop_at_answer_close and _closes(self.tokenizer, token, state.brace_depth, 0):
            return "answer_closed"
        return None


__all__ = ["ExitController", "ExitPolicy", "ExitState", "LynxGenerateOutput", "NeverExit", "ProbeExitPolicy", "SequenceStats",
           "default_layers", "lynx_generate"]
