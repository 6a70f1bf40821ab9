"""The scripts that reuse a LYNX job's events: lynx_feature_shift.py and lynx_layer_sweep.py.

A LYNX job on a tiny random Llama (the grader replaced so both labels occur), then
* lynx_feature_shift.py (the premature-exit rate with features from another dtype / routed): in
  the job's own setting the recomputed features reproduce the collected ones (same rates); in bf16
  with a router the measurement runs and reports every confidence;
* lynx_layer_sweep.py (probes on subsets of the collected layers): the job's own layers reproduce
  the job's probe and calibration; a subset is a probe on those columns only.
"""
from __future__ import annotations

import pytest
import torch

import probes.collect as collect_mod
from conftest import make_tiny_model
from algos.models import load_causal_lm
from probes.pipeline import LynxJobConfig, run_lynx_job
from routers.export import save_router
from routers.router import PathRouter
from script_loader import load_script

shift = load_script("scripts/lynx_feature_shift.py")
sweep = load_script("scripts/lynx_layer_sweep.py")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """(probe dir, router dir) of a LYNX job on a tiny Llama with large random weights (outputs depend on the prefix)."""
    root = tmp_path_factory.mktemp("lynx-shift")
    make_tiny_model(root / "model", initializer_range=0.3, tie_word_embeddings=False)
    patch = pytest.MonkeyPatch()
    patch.setattr(collect_mod, "is_correct", lambda text, gold, require_boxed=True: int(gold) % 2 == 0)
    try:
        run_lynx_job(LynxJobConfig(model_name_or_path=str(root / "model"), dataset="arithmetic", num_problems=16,
                                   num_eval_problems=6, output_dir=str(root / "lynx"), max_new_tokens=10,
                                   answer_max_tokens=4, batch_size=8, cue_preset="linebreak", eval_confidences=(0.8,),
                                   confidence=0.7, progress=False, device="cpu", dtype="float32"))
    finally:
        patch.undo()
    model = load_causal_lm(str(root / "model"))
    router = save_router(PathRouter(2, 32), root / "router", model)
    return root / "lynx", router


def test_same_setting_reproduces_the_collected_rates(job, capsys):
    probe_dir, _ = job
    result = shift.main(["--probe", str(probe_dir), "--device", "cpu", "--dtype", "float32"])
    assert result["calibrated_with"] == {"dtype": "float32", "routing": False} and result["events"] > 0
    assert result["score_change_max"] < 1e-4  # teacher-forced features = the generation's own
    assert [r["premature_exit_rate"] for r in result["shifted"]] == [r["premature_exit_rate"] for r in result["stored"]]
    assert "P(exit | exiting is wrong)" in capsys.readouterr().out


def test_bf16_and_routing_measure_every_confidence(job, capsys):
    probe_dir, router_dir = job
    result = shift.main(["--probe", str(probe_dir), "--device", "cpu", "--dtype", "bfloat16",
                         "--router", str(router_dir), "--confidence", "0.6,0.9"])
    assert result["setting"] == {"dtype": "bfloat16", "routing": True}
    assert [r["confidence"] for r in result["shifted"]] == [0.6, 0.9]
    assert all(0 <= r["premature_exit_rate"] <= 1 or r["continue_events"] == 0 for r in result["shifted"])
    assert result["score_change_max"] > 0  # bf16 and a random router do move the features
    out = capsys.readouterr().out
    assert "calibrated in float32 without routing, features now from bfloat16 with routing" in out


def test_no_regret_job_is_measured_with_its_own_labels(tmp_path, job):
    import json

    model_dir = job[0].parent / "model"
    patch = pytest.MonkeyPatch()  # forced exits right for even answers; rollouts wrong for multiples of 3
    patch.setattr(collect_mod, "is_correct", lambda text, gold, require_boxed=True:
                  int(gold) % 2 == 0 if text.startswith("\nFinal Answer") else int(gold) % 3 != 0)
    try:
        run_lynx_job(LynxJobConfig(model_name_or_path=str(model_dir), dataset="arithmetic", num_problems=16,
                                   num_eval_problems=6, output_dir=str(tmp_path / "lynx"), max_new_tokens=10,
                                   answer_max_tokens=4, batch_size=8, cue_preset="linebreak", eval_confidences=(0.8,),
                                   confidence=0.7, progress=False, device="cpu", dtype="float32",
                                   exit_label="no_regret"))
        result = shift.main(["--probe", str(tmp_path / "lynx"), "--device", "cpu", "--dtype", "float32"])
    finally:
        patch.undo()
    summary = json.loads((tmp_path / "lynx" / "summary.json").read_text())
    want = {r["confidence"]: r["continue_events"] for r in summary["evaluation"]["premature_exits"]}
    assert all(r["continue_events"] == want[r["confidence"]] for r in result["stored"])


def test_missing_summary_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        shift.main(["--probe", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "no summary.json" in err and len(err.splitlines()) == 1


def test_layer_sweep_with_the_jobs_layers_reproduces_its_probe(job, capsys):
    import json

    probe_dir, _ = job
    summary = json.loads((probe_dir / "summary.json").read_text())
    result = sweep.main(["--probe", str(probe_dir), "--layer_sets", "1,2;2"])
    assert result["collected_layers"] == [1, 2]
    full, last = result["rows"]
    assert full["val_auc"] == pytest.approx(summary["training"]["val_auc"])
    assert full["calibration_auc"] == pytest.approx(summary["calibration"]["auc"])
    job_rules = {r["confidence"]: r["q_continue"] for r in summary["calibration"]["rules"]}
    assert {q["confidence"]: q["q_continue"] for q in full["rules"]} == pytest.approx(job_rules)
    assert [q["confidence"] for q in last["rules"]] == [0.7, 0.8]
    # a probe on layer 2's columns alone is another probe: other calibration scores
    assert (last["calibration_auc"], last["rules"][0]["q_continue"]) != (full["calibration_auc"], full["rules"][0]["q_continue"])
    assert "layers 2 " in capsys.readouterr().out


def test_layer_columns_select_each_layers_block_in_the_order_asked():
    assert sweep.layer_columns((5, 10, 15), (15, 5), 2).tolist() == [4, 5, 0, 1]
    with pytest.raises(sweep.SweepError, match="layer\\(s\\) 7 were not collected"):
        sweep.layer_columns((5, 10), (5, 7), 2)
    assert sweep.parse_layer_sets("10,20,30; 5;") == [(10, 20, 30), (5,)]
    for bad, message in (("5,x", "not a comma list"), ("5,5", "twice"), (" ; ", "empty")):
        with pytest.raises(sweep.SweepError, match=message):
            sweep.parse_layer_sets(bad)


def test_layer_sweep_bad_input_is_one_line(job, tmp_path, capsys):
    probe_dir, _ = job
    for argv, message in ((["--probe", str(tmp_path), "--layer_sets", "1"], "no summary.json"),
                          (["--probe", str(probe_dir), "--layer_sets", "3"], "were not collected")):
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_replay_exits_takes_the_first_real_accepted_cue_of_each_rollout():
    from probes.collect import EventSet

    events = EventSet(features=torch.zeros(4, 1), labels=torch.tensor([1, 0, 1, 1], dtype=torch.int8),
                      problem=torch.tensor([0, 0, 1, 2]), event_index=torch.tensor([5, 3, 4, 7]),
                      synthetic=torch.tensor([False, False, False, True]))
    exits = torch.tensor([True, True, False, True])
    out = sweep.replay_exits([0, 1, 2], {0: 50, 1: 20, 2: 30}, {0: True, 1: True, 2: False}, events, exits,
                             {(0, 3): 4, (0, 5): 6, (1, 4): 2, (2, 7): 3}, exit_len=2)
    # problem 0 exits at event index 3 (3 + 2 + 4 tokens, its forced answer wrong); problem 1 is not
    # accepted; problem 2's only event is synthetic, where the decoder never exits
    assert out == {"mean_tokens": pytest.approx((9 + 20 + 30) / 3), "accuracy": pytest.approx(1 / 3),
                   "exit_rate": pytest.approx(1 / 3)}


def test_layer_sweep_replays_no_exit_as_the_rollouts_themselves(job):
    import json

    from probes.collect import EventShards

    probe_dir, _ = job
    result = sweep.main(["--probe", str(probe_dir), "--layer_sets", "1,2"])
    shards = EventShards(json.loads((probe_dir / "summary.json").read_text())["events_dir"])
    lengths = {p: len(r) for p, r in shards.responses().items()}
    held = sorted(lengths)[-result["held_out_problems"]:]
    assert result["no_exit"]["mean_tokens"] == pytest.approx(sum(lengths[p] for p in held) / len(held))
    assert result["no_exit"]["exit_rate"] == 0
    events, answers = shards.load(), shards.answer_lengths()  # one answer per event, <= answer_max_tokens (4)
    assert set(answers) == set(zip(events.problem.tolist(), events.event_index.tolist()))
    assert all(1 <= n <= 4 for n in answers.values())
