"""Dr.LLM dynamic layer routing (arXiv 2510.12773): skip / execute / repeat each block per sequence.

Modules, one job each:
  paths         path <-> per-block action table (0 skip, 1 execute, 2 repeat)
  routed_model  a frozen HF decoder run along per-sequence paths, with a per-pass KV cache
  mcts          UCT search over edited paths (training targets), plus the random-walk baseline
  path_eval     MCTS reward: correctness of greedy generation under a path
  candidate_search  exact search over a few candidate paths, batched across examples (thinking models)
  router        per-block MLP routers with windowed mean pooling, and the p knob
  losses        focal loss with effective-number class weights
  export        safetensors + JSON export, checked against the base model on load
  traces        MCTS over a dataset, traces appended to a resumable jsonl, search summary
  training      teacher-forced router inputs, focal-loss training, per-block accuracy and macro-F1
  evaluate      held-out accuracy routed (decided at prefill) vs dense, blocks executed
"""
