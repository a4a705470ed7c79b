"""Trajectory CSV / lm-eval reading: valid input, and every kind of bad input named by file/line/column."""

import json

import pytest
from _alert_helpers import DEV_ROWS, DEV_RUNS, dev_path

from fineline_monitor.core.trajectory import TrajectoryError, read_trajectory

HEAD = "source,model,params,step,tokens,task,metric,value,stderr\n"


def write(tmp_path, body, name="t.csv"):
    p = tmp_path / name
    p.write_text(HEAD + body)
    return p


def test_reads_unsorted_rows_sorted_and_drops_exact_duplicates(tmp_path):
    p = write(
        tmp_path,
        "s,m,1,20,200,piqa,acc,0.6,\ns,m,1,10,100,piqa,acc,0.5,0.01\ns,m,1,10,100,piqa,acc,0.5,0.01\n",
    )
    t = read_trajectory(p)
    (c,) = t.curves
    assert c.steps.tolist() == [10, 20] and c.values.tolist() == [0.5, 0.6]


@pytest.mark.parametrize(
    "body,match",
    [
        ("s,m,1,x,100,piqa,acc,0.5,\n", r"t.csv:2: column `step` must be"),
        ("s,m,1,10,100,piqa,acc,abc,\n", r"t.csv:2: column `value`"),
        ("s,m,1,10,100,piqa,acc,,\n", r"t.csv:2: column `value`"),
        ("s,m,1,10,-5,piqa,acc,0.5,\n", r"t.csv:2: column `tokens`"),
        (
            "s,m,1,10,100,piqa,acc,0.5,\ns,m,1,10,100,piqa,acc,0.7,\n",
            r"t.csv:3: duplicate step 10 .* line 2",
        ),
        ("s,m,1,10,100,piqa,acc,0.5,\ns,m,1,20,50,piqa,acc,0.6,\n", r"tokens go down"),
        ("s,m,1,10,100,piqa,acc,0.5\n", r"t.csv:2: 8 fields"),
    ],
)
def test_bad_values_name_line_and_column(tmp_path, body, match):
    with pytest.raises(TrajectoryError, match=match):
        read_trajectory(write(tmp_path, body))


def test_missing_and_extra_columns(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("source,model,step,tokens,task,metric,value,stderr,foo\ns,m,1,1,t,acc,0.5,,x\n")
    with pytest.raises(
        TrajectoryError,
        match=r"h.csv:1: bad header: missing columns \['params'\], unexpected "
        r"columns \['foo'\]",
    ):
        read_trajectory(p)
    e = tmp_path / "e.csv"
    e.write_text("")
    with pytest.raises(TrajectoryError, match="empty file"):
        read_trajectory(e)


def test_single_point_curve_is_kept(tmp_path):
    t = read_trajectory(write(tmp_path, "s,m,,5,,piqa,acc,0.5,\n"))
    assert len(t.curves[0]) == 1


def test_lm_eval_results_folder(tmp_path):
    for step, acc in ((1000, 0.55), (3000, 0.6)):
        d = tmp_path / f"step{step}" / "model"
        d.mkdir(parents=True)
        doc = {
            "results": {
                "piqa": {
                    "alias": "piqa",
                    "acc,none": acc,
                    "acc_stderr,none": 0.01,
                    "acc_norm,none": acc + 0.01,
                    "acc_norm_stderr,none": 0.01,
                }
            },
            "config": {"model": "hf", "model_args": "pretrained=EleutherAI/pythia-70m"},
        }
        (d / "results_2024-01-01T00-00-00.json").write_text(json.dumps(doc))
    t = read_trajectory(tmp_path)
    acc = [c for c in t.curves if c.metric == "acc"][0]
    assert acc.steps.tolist() == [1000, 3000] and acc.stderr.tolist() == [0.01, 0.01]
    assert acc.model == "EleutherAI/pythia-70m" and acc.source == "lm-eval"


def test_lm_eval_step_from_revision_and_error_without_step(tmp_path):
    doc = {
        "results": {"piqa": {"acc,none": 0.5}},
        "config": {"model_args": "pretrained=EleutherAI/pythia-70m,revision=step13000"},
    }
    f = tmp_path / "results_a.json"
    f.write_text(json.dumps(doc))
    assert read_trajectory(f).curves[0].steps.tolist() == [13000]
    doc["config"]["model_args"] = "pretrained=x"
    g = tmp_path / "results_b.json"
    g.write_text(json.dumps(doc))
    with pytest.raises(TrajectoryError, match="results_b.json: cannot tell the training step"):
        read_trajectory(g)


def test_gzip_and_real_table():
    t = read_trajectory(dev_path())
    assert len(t.runs()) == DEV_RUNS and t.n_rows == DEV_ROWS
