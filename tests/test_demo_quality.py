"""bench/demo_quality.py's long-video verdicts: the seed-by-seed rule and the defaults it recommends, on
hand-made per-seed results (no model runs)."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("demo_quality", REPO / "bench" / "demo_quality.py")
dq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dq)


def run(last_colour, lost, frames=101):
    """One seed's result as bench_long stores it: (per-segment rows, lost frame, frames)."""
    rows = [{"colour": 0.1, "size": 1.0, "bg": 0.01}, {"colour": last_colour, "size": 1.0, "bg": 0.01}]
    return rows, lost, frames


def results(overrides):
    plain = [run(0.5, 40), run(0.4, 30), run(0.6, 50)]
    out = {name: plain for name, _ in dq.LONG_SETTINGS}
    out.update(overrides)
    return [(name, out[name]) for name, _ in dq.LONG_SETTINGS]


def test_a_setting_helps_only_when_better_on_most_seeds_and_not_lost_earlier():
    plain = [run(0.5, 40), run(0.4, 30), run(0.6, 50)]
    assert dq.paired([run(0.3, 40), run(0.2, 30), run(0.65, 50)], plain)["helps"]       # 2 of 3 better
    # 2 of 3 better, but the mean gain (0.003) is below its standard error (0.007): noise, not a gain
    assert not dq.paired([run(0.49, 40), run(0.39, 30), run(0.61, 50)], plain)["helps"]
    assert not dq.paired([run(0.1, 40), run(0.5, 30), run(0.7, 50)], plain)["helps"]    # 1 of 3 better
    # every seed better by 0.001 (no spread, so above its standard error) but below one 8-bit code value
    assert not dq.paired([run(0.499, 40), run(0.399, 30), run(0.599, 50)], plain)["helps"]
    assert dq.paired([run(0.49, 40), run(0.39, 30), run(0.59, 50)], plain)["helps"]    # 0.01 on every seed
    assert not dq.paired([run(0.3, 20), run(0.3, 10), run(0.5, 50)], plain)["helps"]    # lost earlier
    # a last segment without the object counts as the worst colour error, not as missing
    absent = dq.paired([run(float("nan"), 40), run(0.3, 30), run(0.5, 50)], plain)
    assert absent["dc"][0] == pytest.approx(dq.WORST_COLOUR - 0.5) and not absent["helps"]


def test_recommend_picks_the_best_helping_value_per_widget_and_zero_otherwise():
    res = results({"+ frame guidance w=0.5": [run(0.45, 40), run(0.35, 30), run(0.55, 50)],
                   "+ frame guidance w=1.0": [run(0.2, 60), run(0.2, 40), run(0.3, 70)],
                   "+ perturbation s=0.2": [run(0.1, 10), run(0.1, 10), run(0.1, 10)],  # loses the object
                   "+ both (s=0.1, w=0.5)": [run(0.0, 90), run(0.0, 90), run(0.0, 90)]})  # not one widget
    picks = dq.recommend(res)
    assert picks["frame_guidance"][1] == 1.0
    assert picks["perturbation"] is None and picks["color_anchor"] is None


def test_render_from_json_writes_the_same_file(tmp_path):
    raw = {"args": {"argv": ["--seeds", "2"], "device_name": "CPU", "provenance": "Weights measured: test.",
                    "steps": 2, "cfg": 4.0, "shift": 3.0, "segments": 2, "long_seeds": 3, "long_start": "image"},
           "seconds": 1.0,
           "results": {"vae": {"psnr": 20.0, "adherence": 0.5, "n": 2},
                       "t2v": {"colour": 1.0, "shape": 1.0, "motion": 0.5, "background": 1.0, "all": 0.5, "n": 2},
                       "i2v": {"psnr0": 25.0, "consistency": 0.5, "adherence": 0.5, "n": 2},
                       "long": results({"+ frame guidance w=1.0": [run(0.2, 60), run(0.2, 40), run(0.3, 70)]})}}
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    dq.main(["--render", str(tmp_path / "raw.json"), "--out", str(tmp_path / "q.md")])
    text = (tmp_path / "q.md").read_text()
    assert "Weights measured: test." in text and "**not met**: 50% of 2 seeds" in text
    assert "frame_guidance 1.0 (+ frame guidance w=1.0" in text and "perturbation 0 (no value helps)" in text


def test_provenance_chains_every_training_call_in_order(tmp_path):
    def stage(command, steps, seconds):
        return {"command": command, "dit": {"steps": steps, "batch": 512, "loss_t2v_mean": 0.2,
                                            "loss_i2v_mean": 0.1}, "total_seconds": seconds}
    report = {**stage("train C", 30, 300), "device": "GPU", "torch": "2",
              "args": {"out": "$OUT/C (call 4)", "dit_object_weight": 4.0},
              "vae_stage": {"command": "train v", "total_seconds": 100,
                            "vae": {"image": {"steps": 5, "batch": 8, "frames": 1, "rec_mean": 0.02}}},
              "dit_stages": [stage("train w", 10, 200), stage("train B", 20, 250)]}
    (tmp_path / "train_report.json").write_text(json.dumps(report))
    (tmp_path / "cvg_demo_t2v.safetensors").write_bytes(b"x")
    text = dq.weights_provenance(str(tmp_path))
    assert "`train v` then `train w` then `train B` then `train C`" in text
    assert "850 s in all" in text and "DiT 10 + 20 + 30 steps × 512" in text
    assert "(object cells weighted 1 + 4)" in text and "call 4" in text
