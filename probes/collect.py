"""LYNX data collection: cue events, features and forced-exit labels. DESIGN ONLY, not implemented yet.

This module documents the interface the collection phase of ``train/lynx_probe.py`` will have; the
pieces it composes already exist (:func:`probes.early_exit.lynx_generate`, :mod:`probes.cues`,
:func:`rewards.verify.is_correct`).

Proposed API
------------
``collect_events(model, tokenizer, records, out_dir, *, cue_config, exit_string, layers,
                 batch_size=8, max_new_tokens=512, temperature=0.6, top_p=0.95,
                 answer_max_tokens=64, max_events_per_rollout=200, synthetic_event_at=0.7,
                 forced_batch_size=16, seed=0, progress=True) -> EventShards``

1. **Rollouts and features in one pass** (per batch of problems, one sampled rollout each, prompt
   from :func:`algos.data.build_prompt`)::

       out = lynx_generate(model, tok, ids, mask, policy=NeverExit(layers), cue_config=cue_config,
                           do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=...,
                           record_features=True, synthetic_event_at=0.7, generator=g)

   gives per row the response ids, the event indices (token completing a cue, inside the thinking
   region) and their features (hidden states of ``layers`` from the generation's own forward
   passes); a row without cues gets one synthetic event at 70% of its thinking length.
   At most ``max_events_per_rollout`` events per rollout (evenly spaced subset; 100 for the
   calibration split).
2. **Forced exits** (token ids, never re-tokenised text): for event (row, i) the input is
   ``prompt_ids + response[:i] + exit_ids`` (the cue-completing token dropped); all events of a
   batch are sorted by length and decoded greedily in batches of ``forced_batch_size`` with
   ``model.generate(max_new_tokens=answer_max_tokens)``; label 1 ("safe to exit") iff
   ``is_correct(exit_string + answer_text, gold)``.
3. **On disk as it grows**: ``out_dir/shard-00000.safetensors`` (features float32 (N, D), labels,
   problem index, event index, response length, synthetic flag) plus ``out_dir/progress.json``
   (problems done, settings, model identity); each shard written to a temp file then renamed.
   A rerun with the same settings skips the problems already done (resume); other settings or
   another model stop with a one-line error.
4. ``EventShards.load(split_problems)`` concatenates the shards for a set of problem indices, so
   the trainer splits **by problem** into probe-train and calibration sets (disjoint problems).

Progress: one tqdm bar over problems (rollouts) and one over forced exits, with events so far and
the running positive rate in the postfix.
"""
