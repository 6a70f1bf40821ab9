"""One decoder over a bundle: plain, LYNX early exit, Dr.LLM routing and EAGER branching, any subset.

    decoder = EfficientDecoder.from_pretrained("bundle/")      # or a model path / hub id, probe=, router=
    out = decoder.generate(prompts, early_exit=True, confidence=0.95, routing=True, branching=True,
                           max_new_tokens=256, do_sample=True, temperature=0.7, seed=0)
    out.texts, out.sequences[i].token_ids, .num_tokens, .exit_index, .layers_executed, .parent

``prompts`` are the model's input text (wrap questions with ``algos.data.build_prompt``). Each part
is its own module's decoder; this class only composes them:

* ``routing``: the model is wrapped in :class:`routers.routed_lm.RoutedCausalLM`, an HF-style forward
  along the router's path (chosen once per prompt at prefill, per-path KV cache), so the loops
  below run on it unchanged;
* ``early_exit``: :func:`probes.early_exit.lynx_generate` (probe + split-conformal rule at
  ``confidence`` c = 1 - delta); with ``branching`` too, every EAGER sequence carries its own LYNX
  exit state (:class:`probes.early_exit.ExitController`) through EAGER's loop. The bound
  P(exit | exiting is wrong) <= delta holds for features like the calibration's: with routing on,
  or a dtype other than the one the probe records (``calibrated_with``), the decoder warns once
  (``scripts/lynx_feature_shift.py`` measures the rate in that setting);
* ``branching``: :func:`algos.rollout.eager.eager_generate` (EAGER-init: branch where the top-K entropy
  exceeds ``branch_threshold``, at most ``max_branches`` sequences per prompt; a sequence stops
  branching after ``</think>``, spelled as the tokenizer encodes it:
  :func:`algos.rollout.eager_engine.end_think_ids`);
* everything off: the model's own ``generate`` with the same sampling settings, so for the same
  seed the output is exactly HF's. Every part uses only the settings passed here: extra processors
  in a checkpoint's ``generation_config`` (repetition penalty, ...) are not applied.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch


class DecoderError(ValueError):
    """A decoder setting cannot be honoured; the message names what to fix."""


@dataclass
class DecodedSequence:
    """One generated sequence and what it cost."""

    prompt_index: int
    token_ids: list[int]                 # response tokens (no prompt, no padding; EOS kept if produced)
    text: str                            # decoded response, special tokens skipped
    finish_reason: str                   # "eos", "length", "answer_length", "answer_closed"
    layers_executed: int                 # block evaluations per token (sum of the path; L when dense)
    num_layers: int                      # L of the dense model
    exited: bool = False                 # LYNX exit taken
    exit_index: int | None = None        # thinking tokens kept before the exit string
    parent: int | None = None            # EAGER: index (in ``sequences``) of the sequence it forked from
    fork_step: int | None = None         # EAGER: response position of its first own token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def generated_tokens(self) -> int:
        """Tokens decoded for this sequence: an EAGER child's prefix copied from its parent is not counted."""
        return len(self.token_ids) - (self.fork_step or 0)


@dataclass
class DecodeOutput:
    sequences: list[DecodedSequence]     # grouped by prompt, prompts in input order
    num_prompts: int
    seconds: float = 0.0                 # wall time of the call
    settings: dict = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.sequences]

    def by_prompt(self) -> list[list[DecodedSequence]]:
        groups: list[list[DecodedSequence]] = [[] for _ in range(self.num_prompts)]
        for s in self.sequences:
            groups[s.prompt_index].append(s)
        return groups

    @property
    def total_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)

    @property
    def generated_tokens(self) -> int:
        """Tokens decoded in all (EAGER children count from their fork): the cost to compare with parallel sampling."""
        return sum(s.generated_tokens for s in self.sequences)


def _trim(ids: list[int], eos: set[int], pad: int | None) -> tuple[list[int], str]:
    """Response ids up to and including the first EOS; trailing pads dropped."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1], "eos"
    while ids and pad is not None and ids[-1] == pad and pad not in eos:
        ids = ids[:-1]
    return ids, "length"


def _concatenate(chunks: list[DecodeOutput]) -> DecodeOutput:
    """One output from per-chunk outputs: prompt and parent indices shifted to the whole list."""
    sequences, prompts = [], 0
    for chunk in chunks:
        shift = len(sequences)
        for s in chunk.sequences:
            s.prompt_index += prompts
            s.parent = None if s.parent is None else s.parent + shift
            sequences.append(s)
        prompts += chunk.num_prompts
    return DecodeOutput(sequences, prompts, sum(c.seconds for c in chunks), chunks[0].settings)


class EfficientDecoder:
    """A policy with an optional LYNX probe and Dr.LLM router; see the module docstring."""

    def __init__(self, model, tokenizer, probe=None, router=None, manifest: dict | None = None,
                 router_p: float | None = None):
        from algos.rollout.eager_engine import end_think_ids
        from routers.router import PURE_ROUTER_P

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.probe = probe
        self.router = router
        self.manifest = manifest
        self.router_p = PURE_ROUTER_P if router_p is None else float(router_p)  # the router export's knob
        self.num_layers = int(model.config.num_hidden_layers)
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids, default=0)
        self.end_think = end_think_ids(tokenizer)  # EAGER branches only inside the thinking region
        self._warned: set[str] = set()

    def fingerprints(self) -> dict:
        """Short sha256 of the model (:func:`algos.fingerprint.weight_fingerprint`), the probe and the
        router: what results depend on."""
        from algos.fingerprint import weight_fingerprint
        from routers.export import tensor_digest

        probe = None
        if self.probe is not None:
            cal = self.probe.calibration
            probe = tensor_digest(list(self.probe.probe.state_dict().values())
                                  + [torch.as_tensor(cal.safe_scores), torch.as_tensor(cal.continue_scores)])
        return {"model": weight_fingerprint(self.model), "probe": probe,
                "router": tensor_digest(self.router.state_dict().values()) if self.router is not None else None,
                "router_p": self.router_p if self.router is not None else None}

    @classmethod
    def from_pretrained(cls, path: str | None, probe: str | None = None, router: str | None = None,
                        dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                        verify: bool = True) -> "EfficientDecoder":
        """Load a bundle (``scripts/export.py``; its files are checked against the manifest's hashes
        unless ``verify=False``) or a plain model (hub id, local path, None = embedded default)
        with an optional probe / router directory. Parts for another model are refused (structure and
        :func:`algos.fingerprint.weight_fingerprint`; a bundle's own parts were checked at export and
        are covered by its file hashes). A kept LoRA adapter is merged in float32 on the CPU, then cast.
        ``device`` / ``dtype``: 'auto' is CUDA with bfloat16 where available, else CPU with float32
        (:mod:`algos.device`); the probe and the router move to the model's device."""
        from algos.device import resolve_device_dtype
        from algos.models import load_causal_lm, load_tokenizer
        from deploy.bundle import MANIFEST, is_bundle, verify_bundle
        from probes.export import load_probe
        from routers.export import META_FILE as ROUTER_META
        from routers.export import load_router

        manifest, own = None, set()
        if path is not None and is_bundle(path):
            manifest = verify_bundle(path) if verify else json.loads((Path(path) / MANIFEST).read_text())
            parts = manifest["parts"]
            own = {k for k, given in (("probe", probe), ("router", router)) if parts.get(k) and not given}
            probe = probe or (str(Path(path) / parts["probe"]) if parts.get("probe") else None)
            router = router or (str(Path(path) / parts["router"]) if parts.get("router") else None)
            path = str(Path(path) / parts["model"])
        device, dtype = resolve_device_dtype(device, dtype)
        adapter = manifest["parts"].get("adapter") if manifest is not None else None
        model = load_causal_lm(path, dtype=torch.float32 if adapter else dtype)
        tokenizer = load_tokenizer(path)
        if adapter:  # kept LoRA adapter: merged in memory (fp32, CPU: the export checked the parts this way)
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(Path(path).parent / adapter)).merge_and_unload().to(dtype)
        model = model.to(device)
        # a bundle's model directory is a renamed copy of the policy: compare structure, not names
        loaded_probe = (load_probe(probe, model, check_name=manifest is None, check_weights="probe" not in own)
                        if probe else None)
        if loaded_probe is not None:
            loaded_probe.probe.to(device)
        if router and not Path(router, ROUTER_META).is_file() and Path(router, "router", ROUTER_META).is_file():
            router = str(Path(router, "router"))  # a train/drllm_router.py output_dir holds the export in router/
        loaded_router, router_meta = (load_router(router, model, device=device, check_weights="router" not in own)
                                      if router else (None, {}))
        return cls(model, tokenizer, loaded_probe, loaded_router, manifest, router_meta.get("p_default"))

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: list[str], *, early_exit: bool = False, confidence: float | None = None,
                 routing: bool = False, branching: bool = False, max_new_tokens: int = 256,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, routing_p: float | None = None, max_branches: int = 8,
                 branch_threshold: float = 2.0, entropy_top_k: int = 20, dynamic_threshold: bool = False,
                 answer_max_tokens: int | None = None,
                 stop_at_answer_close: bool = True, batch_size: int | None = None) -> DecodeOutput:
        """Generate for every prompt with the chosen parts (see the module docstring).

        Sampling settings are HF's (``do_sample``, ``temperature``, ``top_k`` 0 = off, ``top_p``);
        ``seed`` seeds torch's global generator first. ``confidence`` c = 1 - delta for the exit rule
        (default: the probe's). ``routing_p``: the router's knob in [-1, 1] (-0.5 = the router alone,
        higher values blend toward executing every block; default: the value stored in the router export).
        ``max_branches`` / ``branch_threshold`` / ``entropy_top_k``: EAGER's M / theta (nats) / K;
        ``dynamic_threshold``: theta_eff = max(theta, 99th percentile of the prompt's entropies so far).
        LYNX answers after an exit are greedy, at most ``answer_max_tokens`` (default: the probe's),
        and stop when the exit string's brace closes (``stop_at_answer_close``). ``batch_size``: decode
        the prompts in chunks of this many (chunk k seeded with ``seed + k``); default: one batch."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise DecoderError("generate needs at least one prompt")
        if batch_size is not None and batch_size < 1:
            raise DecoderError(f"batch_size must be >= 1, got {batch_size}")
        options = dict(early_exit=early_exit, confidence=confidence, routing=routing, branching=branching,
                       max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                       top_p=top_p, routing_p=routing_p, max_branches=max_branches, branch_threshold=branch_threshold,
                       entropy_top_k=entropy_top_k, dynamic_threshold=dynamic_threshold,
                       answer_max_tokens=answer_max_tokens,
                       stop_at_answer_close=stop_at_answer_close)
        if batch_size is not None and len(prompts) > batch_size:
            chunks = [self.generate(prompts[start:start + batch_size], seed=None if seed is None else seed + k, **options)
                      for k, start in enumerate(range(0, len(prompts), batch_size))]
            return _concatenate(chunks)
        if early_exit and self.probe is None:
            raise DecoderError("early_exit=True needs a LYNX probe: load a bundle with probe/ or pass probe=")
        if early_exit and confidence is None and self.probe.default_confidence is None:
            raise DecoderError("early_exit=True needs a confidence (the probe stores no default): pass confidence=0.95")
        if early_exit and confidence is not None and not 0 < confidence < 1:
            raise DecoderError(f"confidence must lie in (0, 1), got {confidence}")
        if routing and self.router is None:
            raise DecoderError("routing=True needs a Dr.LLM router: load a bundle with router/ or pass router=")
        if max_new_tokens < 1:
            raise DecoderError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise DecoderError(f"temperature must be > 0 when sampling, got {temperature}")
        if early_exit:
            self._warn_if_features_shift(routing)
        settings = {**options, "seed": seed}
        if seed is not None:
            torch.manual_seed(seed)
        start = time.perf_counter()
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left",
                             add_special_tokens=False)
        device = next(self.model.parameters()).device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        model, routed = self.model, None
        if routing:
            from routers.routed_lm import RoutedCausalLM

            routed = RoutedCausalLM(self.model, decide=self.router.decider(self.router_p if routing_p is None
                                                                             else routing_p))
            model = routed
        sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        if branching:
            seqs = self._eager(model, ids, mask, max_new_tokens, sampling, max_branches, branch_threshold,
                               entropy_top_k, dynamic_threshold, early_exit, confidence, answer_max_tokens,
                               stop_at_answer_close)
        elif early_exit:
            seqs = self._lynx(model, ids, mask, max_new_tokens, sampling, confidence, answer_max_tokens,
                              stop_at_answer_close)
        else:
            seqs = self._plain(model, ids, mask, max_new_tokens, sampling)
        if routed is not None:
            per_prompt = routed.prompt_layers_executed(len(prompts))
            for s in seqs:
                s.layers_executed = per_prompt[s.prompt_index]
        return DecodeOutput(seqs, len(prompts), time.perf_counter() - start, settings)

    def _warn_if_features_shift(self, routing: bool) -> None:
        """Warn once (one line) when LYNX's features differ from those its probe was calibrated on."""
        from algos.device import dtype_name

        calibrated = self.probe.calibrated_with  # {} for probes that do not record it
        dtype = dtype_name(next(self.model.parameters()).dtype)
        shifts = []
        if calibrated.get("dtype") and calibrated["dtype"] != dtype:
            shifts.append(f"the model runs in {dtype} but the probe was calibrated in {calibrated['dtype']}")
        if routing and not calibrated.get("routing"):
            shifts.append("Dr.LLM routing is on but the probe was calibrated without it")
        message = "; ".join(shifts)
        if message and message not in self._warned:
            self._warned.add(message)
            command = f"scripts/lynx_feature_shift.py --dtype {dtype}" + (" --router ..." if routing else "")
            warnings.warn(f"LYNX early exit: {message}, so premature exits may exceed delta = 1 - confidence; "
                          f"measure them with {command}", stacklevel=4)  # past torch.no_grad: the caller

    # ------------------------------------------------------------------ the parts
    def _sequence(self, prompt_index: int, response: list[int], **extra) -> DecodedSequence:
        ids, reason = _trim(list(response), self.eos_ids, self.pad_id)
        extra.setdefault("finish_reason", reason)
        return DecodedSequence(prompt_index=prompt_index, token_ids=ids,
                               text=self.tokenizer.decode(ids, skip_special_tokens=True),
                               layers_executed=self.num_layers, num_layers=self.num_layers, **extra)

    def _plain(self, model, ids, mask, max_new_tokens, sampling) -> list[DecodedSequence]:
        """HF ``generate`` (the routed wrapper has its own loop with the same sampling rules)."""
        if model is self.model:
            from transformers import GenerationConfig

            # only these settings, like the other parts (a checkpoint's repetition penalty etc. is not applied)
            config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=sorted(self.eos_ids),
                                      pad_token_id=self.pad_id, **(sampling if sampling["do_sample"] else {}))
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            sequences = out[:, ids.shape[1]:].tolist()
        else:
            from probes.early_exit import lynx_generate

            out = lynx_generate(model, self.tokenizer, ids, mask, max_new_tokens=max_new_tokens,
                                pad_token_id=self.pad_id, **sampling)
            sequences = out.sequences[:, ids.shape[1]:].tolist()
        return [self._sequence(i, r) for i, r in enumerate(sequences)]

    def _lynx(self, model, ids, mask, max_new_tokens, sampling, confidence, answer_max_tokens,
              stop_at_answer_close) -> list[DecodedSequence]:
        from probes.early_exit import lynx_generate

        out = lynx_generate(model, self.tokenizer, ids, mask, probe=self.probe, confidence=confidence,
                            max_new_tokens=max_new_tokens, answer_max_tokens=answer_max_tokens,
                            stop_at_answer_close=stop_at_answer_close, pad_token_id=self.pad_id, **sampling)
        seqs = []
        for i, (row, st) in enumerate(zip(out.sequences[:, ids.shape[1]:].tolist(), out.stats)):
            s = self._sequence(i, row[: st.new_tokens], exited=st.exited, exit_index=st.exit_index)
            s.finish_reason = st.finish_reason
            seqs.append(s)
        return seqs

    def _eager(self, model, ids, mask, max_new_tokens, sampling, max_branches, branch_threshold, entropy_top_k,
               dynamic_threshold, early_exit, confidence, answer_max_tokens, stop_at_answer_close) -> list[DecodedSequence]:
        from algos.rollout.eager import EagerParams, eager_generate

        if not sampling["do_sample"]:
            raise DecoderError("branching samples its sequences: pass do_sample=True (and a temperature)")
        params = EagerParams(max_sequences=max_branches, threshold=branch_threshold, entropy_top_k=entropy_top_k,
                             dynamic_threshold=dynamic_threshold,
                             max_new_tokens=max_new_tokens, temperature=sampling["temperature"],
                             top_k=sampling["top_k"], top_p=sampling["top_p"], do_sample=True)
        exits = None
        if early_exit:
            from probes.early_exit import ExitController

            exits = ExitController(self.tokenizer, self.probe, confidence=confidence,
                                   answer_max_tokens=answer_max_tokens, stop_at_answer_close=stop_at_answer_close,
                                   num_layers=self.num_layers, hidden_size=int(self.model.config.hidden_size),
                                   device=ids.device)
        raw = eager_generate(model, ids, mask, params, self.eos_ids, end_think_ids=self.end_think, exits=exits)
        order = sorted(range(len(raw)), key=lambda i: (raw[i].prompt_index, i))
        position = {old: new for new, old in enumerate(order)}
        seqs = []
        for old in order:
            r = raw[old]
            s = self._sequence(r.prompt_index, r.token_ids, parent=position.get(r.parent), fork_step=r.fork_step,
                               exited=r.exited, exit_index=r.exit_index)
            if r.finish_reason in ("answer_length", "answer_closed"):
                s.finish_reason = r.finish_reason
            seqs.append(s)
        return seqs


__all__ = ["DecodeOutput", "DecodedSequence", "DecoderError", "EfficientDecoder"]
