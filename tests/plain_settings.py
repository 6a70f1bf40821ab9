"""The trainer's defaults are the headline run (the thinking model, vLLM rollouts, bf16). Tests on the
tiny model pin the plain settings they were written for: the arithmetic task, our own sampler, fp32,
temperature 1, one micro-batch per step, no evaluation before training, no dynamic sampling."""
PLAIN = dict(dataset="arithmetic", use_vllm=False, bf16=False, temperature=1.0,
             gradient_accumulation_steps=1, eval_on_start=False, dynamic_sampling=False)
PLAIN_FLAGS = [f"--{key}={value}" for key, value in PLAIN.items()]
