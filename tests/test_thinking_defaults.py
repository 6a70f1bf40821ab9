"""Defaults that suit thinking models (</think>): LYNX collection length, Dr.LLM path-evaluation length."""
from __future__ import annotations

import pytest


class _Tokenizer:
    def __init__(self, thinking: bool):
        self.vocab = {"a": 0, **({"</think>": 1} if thinking else {})}
        self.chat_template = ""

    def get_vocab(self):
        return self.vocab


def test_lynx_collection_length_defaults_to_4096_for_a_thinking_model():
    from probes.pipeline import LynxJobConfig, default_max_new_tokens, validate

    assert default_max_new_tokens(_Tokenizer(True)) == 4096
    assert default_max_new_tokens(_Tokenizer(False)) == 512
    assert LynxJobConfig().max_new_tokens is None  # resolved per model when the job starts
    validate(LynxJobConfig())


def test_router_path_evaluations_default_by_model_and_refuse_15_tokens_for_a_thinking_model():
    from routers.traces import TraceError
    from train.drllm_router import path_eval_tokens

    assert path_eval_tokens(None, thinking=True) == 1024
    assert path_eval_tokens(None, thinking=False) == 15
    assert path_eval_tokens(15, thinking=False) == 15 and path_eval_tokens(256, thinking=True) == 256
    with pytest.raises(TraceError, match=r"^--max_new_tokens 15 cannot work with this model: it thinks first"):
        path_eval_tokens(15, thinking=True)


def test_router_job_stops_with_one_line_for_a_thinking_model_at_15_tokens(tiny_model_path, tmp_path, capsys,
                                                                           monkeypatch):
    import probes.cues
    from train import drllm_router

    monkeypatch.setattr(probes.cues, "has_thinking_block", lambda tokenizer: True)
    with pytest.raises(SystemExit) as exit_info:
        drllm_router.main(["--model_name_or_path", tiny_model_path, "--max_new_tokens", "15", "--device", "cpu",
                           "--output_dir", str(tmp_path / "run"), "--progress", "false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot work with this model" in err[0]
    assert not (tmp_path / "run").exists()
