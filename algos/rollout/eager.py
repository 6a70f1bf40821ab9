"""EAGER-init: entropy-aware branching generation (arXiv 2510.11170), batched across prompts.

Each prompt starts as one sequence (``copies`` sequences for the full-parallel baseline). All live
sequences of all prompts advance one token per step in one batched forward pass over a shared KV
cache. After a step's logits are known, a sequence *branches* when

    H_t = -sum_{top-K} p~ log p~  >  theta_eff,     p~ = softmax(top-K logits)  (T = 1, nats)

and its prompt has created fewer than ``cap`` sequences, has not closed branching, and the
sequence has not left the thinking region (its tokens end with a spelling of the end-of-thinking
marker in ``end_think_ids``, e.g. :func:`algos.rollout.eager_engine.end_think_ids`, or it took a LYNX exit). On a branch the sampled token is discarded: the parent
takes the top-1 token and a new child, which copies the parent's prefix and KV-cache rows (one
``index_select`` on the cache, no recomputation), takes the top-2 token (``sample_fork``: both
drawn from p without replacement instead). Each sequence branches at most once per step.
A prompt's branching closes at the cap or after ``quiet_steps`` steps without a branch; its
sequences then finish by plain sampling. ``dynamic_threshold``: theta_eff = max(theta, 99th
percentile of the entropies this prompt has seen so far) (reference default: on), read from a
running histogram (:class:`algos.rollout.quantile.RunningQuantile`, 4096 bins over [0, ln K],
within 0.001 nats for K = 20), so a step costs the same after 100 or 300k entropies.

Finished sequences (EOS or length) leave the batch, so their rows stop costing compute.
Recorded per token: the policy's real log-prob of the chosen token under the tempered
distribution log softmax(z / T) (also for the deterministic fork tokens), and that distribution's
entropy; these are what the RL trainer's importance ratio and logs use.

``exits`` (a :class:`probes.early_exit.ExitController`) adds LYNX early exits: every sequence
carries its own exit state (copied when it forks); a cue-completing token is scored after its
forward pass and, on exit, rolled back (its attention-mask slot is zeroed, so the next token
reuses its position), then the exit string is fed and the answer decoded greedily. An exited
sequence no longer branches. The thinking budget stays ``max_new_tokens``; the exit string and
answer may go beyond it. Any model with an HF forward works, including
:class:`routers.routed_lm.RoutedCausalLM` (its own cache comes from ``model.new_cache()``).

Reference differences (see ../shared/papers/eager.md): the reference steps one prompt at a time with
one engine call per token and re-tokenised text; here prompts are batched, we work on token ids,
and children fork the parent's KV rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from algos.hf_compat import cache_arg
from algos.rollout.base import mask_top_k_top_p
from algos.rollout.quantile import RunningQuantile


@dataclass
class EagerParams:
    """EAGER-init settings (defaults from the reference, M reduced for CPU use)."""

    max_sequences: int = 8          # cap M per prompt
    threshold: float = 2.0          # theta, nats of top-K renormalised entropy
    entropy_top_k: int = 20         # K
    quiet_steps: int = 1000         # close branching after this many steps without a branch
    dynamic_threshold: bool = False
    sample_fork: bool = False       # fork tokens sampled without replacement instead of top-1/top-2
    max_new_tokens: int = 128
    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True

    def __post_init__(self):
        if self.max_sequences < 1:
            raise ValueError(f"EAGER max_sequences (M) must be >= 1, got {self.max_sequences}")
        if self.entropy_top_k < 2:
            raise ValueError(f"EAGER entropy_top_k must be >= 2, got {self.entropy_top_k}")
        if self.temperature <= 0:
            raise ValueError(f"EAGER temperature must be > 0, got {self.temperature}")


@dataclass
class EagerSequence:
    prompt_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    finish_reason: str = ""
    parent: int | None = None       # index of the parent sequence in the output list
    fork_step: int | None = None    # response position of the child's first own token
    left_thinking: bool = False
    exited: bool = False            # LYNX exit taken (with ``exits``)
    exit_index: int | None = None   # response index of the rolled-back cue token = thinking tokens kept
    exit_state: object = field(default=None, repr=False)

    @property
    def generated_tokens(self) -> int:
        """Tokens this sequence sampled itself: a child's prefix copied from its parent is not counted."""
        return len(self.token_ids) - (self.fork_step or 0)


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """H = -sum_{i in top-k} p~_i log p~_i with p~ the softmax of the top-k logits, (R, V) -> (R,)."""
    top = logits.float().topk(min(k, logits.shape[-1]), dim=-1).values
    logp = torch.log_softmax(top, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


@torch.no_grad()
def eager_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: EagerParams,
                   eos_token_ids, *, end_think_ids=(), caps: list[int] | None = None,
                   thresholds: list[float] | None = None, copies: int = 1,
                   generator: torch.Generator | None = None, exits=None) -> list[EagerSequence]:
    """EAGER-init over a left-padded batch of prompts, (P, L). Returns every sequence created,
    in creation order. ``end_think_ids``: spellings of the end-of-thinking marker, each a list of
    token ids (a bare id is a one-token spelling); a sequence stops branching once its tokens end
    with one. ``caps`` / ``thresholds`` override M / theta per prompt; ``copies`` > 1
    starts each prompt with that many independent sequences (with theta = inf: full parallel)."""
    p = params
    num_prompts = input_ids.shape[0]
    caps = list(caps) if caps is not None else [p.max_sequences] * num_prompts
    thetas = list(thresholds) if thresholds is not None else [p.threshold] * num_prompts
    eos = set(eos_token_ids)
    end_think = [list(m) if isinstance(m, (list, tuple)) else [int(m)] for m in end_think_ids]

    ids = input_ids.repeat_interleave(copies, dim=0)
    mask = attention_mask.repeat_interleave(copies, dim=0)
    seqs = [EagerSequence(prompt_index=i // copies, exit_state=exits.new_state() if exits else None)
            for i in range(ids.shape[0])]
    rows = list(range(len(seqs)))                      # batch row -> sequence index
    created = [copies] * num_prompts
    open_ = [caps[i] > created[i] for i in range(num_prompts)]
    quiet = [0] * num_prompts
    # the entropies each prompt has seen, as a histogram (O(1) per step; dynamic threshold only)
    seen = (RunningQuantile(num_prompts, 0.0, math.log(p.entropy_top_k), device=input_ids.device)
            if p.dynamic_threshold else None)

    cache = model.new_cache() if hasattr(model, "new_cache") else DynamicCache(config=model.config)
    limit = p.max_new_tokens + (exits.extra_tokens if exits is not None else 0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), **cache_arg(cache),
                use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    previous = None  # with exits: each row's logits before its last token (what a rollback returns to)
    for step in range(limit):
        if exits is not None:
            mask, logits = _score_cues(exits, out, seqs, rows, mask, logits, previous)
        scaled = logits / p.temperature
        logp = torch.log_softmax(scaled, dim=-1)
        entropy = -(logp.exp() * logp).nansum(dim=-1)
        if p.do_sample:
            probs = torch.softmax(mask_top_k_top_p(scaled, p.top_k, p.top_p), dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            probs = None
            tokens = scaled.argmax(dim=-1)
        forced = set()
        if exits is not None:  # exiting sequences take the exit string, then greedy answer tokens
            greedy = None
            for r, s in enumerate(rows):
                state = seqs[s].exit_state
                if not exits.thinking(state):
                    greedy = scaled.argmax(dim=-1) if greedy is None else greedy
                    tokens[r], was_forced = exits.next_token(state, int(tokens[r]), int(greedy[r]))
                    if was_forced:
                        forced.add(r)

        # Branching decisions (rare: only rows over their prompt's threshold are visited).
        children: list[tuple[int, int]] = []           # (parent row, child token)
        prompt_of_row = [seqs[s].prompt_index for s in rows]
        if any(open_):
            h = topk_entropy(logits, p.entropy_top_k)
            theta_row = torch.tensor([thetas[q] if open_[q] else float("inf") for q in prompt_of_row], device=h.device)
            prompt_row = torch.tensor(prompt_of_row, device=h.device)
            if seen is not None:  # theta_eff = max(theta, 99th percentile of the entropies seen so far)
                theta_row = torch.maximum(theta_row, seen.quantile(0.99).to(h.device)[prompt_row].nan_to_num(-math.inf))
            branched = set()
            for r in torch.nonzero(h > theta_row).flatten().tolist():
                q = prompt_of_row[r]
                if seqs[rows[r]].left_thinking or created[q] >= caps[q]:
                    continue
                first, second = _fork_tokens(scaled[r], probs[r] if probs is not None else None,
                                             p.sample_fork, generator)
                tokens[r] = first
                children.append((r, second))
                created[q] += 1
                branched.add(q)
            if seen is not None:
                still_open = torch.tensor([open_[q] for q in prompt_of_row], device=h.device)
                seen.add(prompt_row[still_open], h[still_open])
            for q in set(prompt_of_row):
                if not open_[q]:
                    continue
                quiet[q] = 0 if q in branched else quiet[q] + 1
                if created[q] >= caps[q] or quiet[q] >= p.quiet_steps:
                    open_[q] = False

        # Append tokens; children copy their parent's history first.
        token_list = tokens.tolist()
        chosen_logp = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
        entropy_list = entropy.tolist()
        new_rows, new_tokens = [], []
        for r, s in enumerate(rows):
            _append(seqs[s], token_list[r], chosen_logp[r], entropy_list[r], end_think)
        for r, tok in children:
            parent = seqs[rows[r]]
            child = EagerSequence(prompt_index=parent.prompt_index, token_ids=parent.token_ids[:-1],
                                  logprobs=parent.logprobs[:-1], entropies=parent.entropies[:-1],
                                  parent=rows[r], fork_step=step, left_thinking=parent.left_thinking,
                                  exit_state=exits.fork(parent.exit_state) if exits is not None else None)
            _append(child, tok, float(logp[r, tok]), entropy_list[r], end_think)
            seqs.append(child)
            rows.append(len(seqs) - 1)
            token_list.append(tok)
        parent_row = list(range(len(prompt_of_row))) + [r for r, _ in children]
        done: dict[int, str] = {}
        if exits is not None:  # children were forked from their parent's state before this token
            for i, s in enumerate(rows):  # (children never take forced tokens: exited rows do not branch)
                reason = exits.push(seqs[s].exit_state, token_list[i], i in forced)
                if reason:
                    done[i] = reason
        for i, s in enumerate(rows):
            thinking = exits is None or exits.thinking(seqs[s].exit_state)
            if token_list[i] in eos:
                seqs[s].finish_reason = "stop"
            elif i in done:
                seqs[s].finish_reason = done[i]
            elif (thinking and len(seqs[s].token_ids) >= p.max_new_tokens) or step == limit - 1:
                seqs[s].finish_reason = "length"
            else:
                new_rows.append(i)
                new_tokens.append(token_list[i])
        if not new_rows:
            break
        index = torch.tensor([parent_row[i] for i in new_rows], device=ids.device)
        if len(new_rows) != len(prompt_of_row) or children:
            _keep_cache_rows(cache, [parent_row[i] for i in new_rows], ids.device)
            mask = mask.index_select(0, index)
        rows = [rows[i] for i in new_rows]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        want_hidden = exits is not None and any(seqs[s].exit_state.pending for s in rows)
        if want_hidden:
            previous = logits.index_select(0, index) if (len(new_rows) != len(prompt_of_row) or children) else logits
        out = model(input_ids=torch.tensor(new_tokens, device=ids.device)[:, None], attention_mask=mask,
                    position_ids=_positions(mask)[:, -1:], **cache_arg(cache), use_cache=True,
                    **({"output_hidden_states": True} if want_hidden else {}))
        logits = out.logits[:, -1].float()
    return seqs


def _score_cues(exits, out, seqs: list[EagerSequence], rows: list[int], mask: torch.Tensor, logits: torch.Tensor,
                previous: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """LYNX: score the sequences whose last fed token completed a cue; roll back those that exit
    (the token leaves the sequence, its attention-mask slot is zeroed and the row's logits go back
    to those before it). Returns (mask, logits)."""
    pending = [r for r, s in enumerate(rows) if seqs[s].exit_state.pending]
    if not pending:
        return mask, logits
    features = torch.cat([out.hidden_states[layer][pending, -1] for layer in exits.layers], dim=-1).float()
    decisions = exits.decide([seqs[rows[r]].exit_state for r in pending], features)
    leaving = [r for r, leave in zip(pending, decisions) if leave]
    if not leaving:
        return mask, logits
    for r in leaving:
        seq = seqs[rows[r]]
        seq.exited, seq.exit_index, seq.left_thinking = True, len(seq.token_ids) - 1, True
        del seq.token_ids[-1], seq.logprobs[-1], seq.entropies[-1]
    mask, logits = mask.clone(), logits.clone()
    mask[leaving, -1] = 0
    logits[leaving] = previous[leaving]
    return mask, logits


def contiguous_rows(rows: list[int]) -> slice | None:
    """``slice(a, b)`` when ``rows`` is a..b-1 in order (rows dropped only at the ends), else None."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return None


def _keep_cache_rows(cache, rows: list[int], device) -> None:
    """The cache's rows become ``rows`` (repeats for forks). Rows dropped only at the ends are a view
    of each layer's tensors (no copy); otherwise ``reorder_cache`` copies each layer's kept rows, one
    layer at a time (transient memory: one layer, not the whole cache)."""
    window = contiguous_rows(rows)
    if window is not None and type(cache) is DynamicCache:  # other caches (Dr.LLM's PathCache) reorder their own way
        cache.batch_select_indices(window)
    else:
        cache.reorder_cache(torch.tensor(rows, device=device))


def _effective_theta(theta: float, seen: list[float], dynamic: bool) -> float:
    """The exact definition (reference): max(theta, torch.quantile(seen, 0.99)); O(len(seen)).
    ``eager_generate`` reads the percentile from a :class:`RunningQuantile` instead (within one bin)."""
    if not dynamic or not seen:
        return theta
    return max(theta, float(torch.quantile(torch.tensor(seen), 0.99)))


def _fork_tokens(scaled: torch.Tensor, probs: torch.Tensor | None, sample_fork: bool,
                 generator: torch.Generator | None) -> tuple[int, int]:
    """Parent / child tokens of a branch: top-1 / top-2, or two draws without replacement."""
    if sample_fork and probs is not None and int((probs > 0).sum()) >= 2:
        pair = torch.multinomial(probs, 2, replacement=False, generator=generator)
    else:
        pair = scaled.topk(2).indices
    return int(pair[0]), int(pair[1])


def _append(seq: EagerSequence, token: int, logprob: float, entropy: float, end_think: list[list[int]]) -> None:
    seq.token_ids.append(token)
    seq.logprobs.append(logprob)
    seq.entropies.append(entropy)
    if any(token == m[-1] and seq.token_ids[-len(m):] == m for m in end_think):
        seq.left_thinking = True
