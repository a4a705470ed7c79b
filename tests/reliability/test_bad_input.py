"""Bad input at scale: property-based tests over the three parsers a user feeds directly.

- the config loader (`MonitorConfig.from_dict`, `MonitorConfig.from_yaml`),
- the requests JSONL parser (`fineline_monitor.probes.tasks.load_requests_file`),
- the trajectory CSV parser (`fineline_monitor.core.trajectory.read_trajectory`).

For any input: either it parses, or it raises the parser's documented error type (a
ValueError subclass: ConfigError / TaskError / TrajectoryError) whose message starts with
where (the file, file:line, or the config's name) and says what. Any other exception type
is an uncaught traceback a user would see at attach time: a failure here.
Example counts are bounded (CI time) and the inputs are biased towards near-valid ones,
which reach deeper into the parsers than random noise does.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fineline_monitor.core.config import ConfigError, MonitorConfig

AREA = "bad input (hypothesis)"
SETTINGS = dict(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

pytestmark = pytest.mark.timeout(300)


_SCRATCH = []


def _scratch(factory) -> Path:
    """One folder for all examples (a new temp folder per example costs more than the parse)."""
    if not _SCRATCH:
        _SCRATCH.append(factory.mktemp("bad-input"))
    return _SCRATCH[0]


class Counter:
    """Counts examples tried / rejected with the documented error, for the fault table."""

    def __init__(self):
        self.tried = 0
        self.rejected = 0
        self.unexpected = 0  # an undocumented exception type, or a broken check on the result

    @contextlib.contextmanager
    def track(self):
        self.tried += 1
        try:
            yield
        except BaseException:
            self.unexpected += 1
            raise

    def outcome(self, documented: str) -> str:
        if self.unexpected:
            return f"**{self.unexpected} input(s) failed** (undocumented exception or bad result; see tests)"
        return documented


# ---- the config loader --------------------------------------------------------------------------


def _field_names():
    import dataclasses

    names = {}
    for f in dataclasses.fields(MonitorConfig):
        t = f.default_factory() if f.default is dataclasses.MISSING else f.default
        names[f.name] = (
            [g.name for g in dataclasses.fields(t)] if dataclasses.is_dataclass(t) else None
        )
    return names


FIELDS = _field_names()
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "store",
            "console",
            "stop",
            "checkpoint",
            "http",
            "warning",
            "default",
            "1e3",
            "",
            "offline",
            "wandb",
        ]
    )
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def config_dicts(draw):
    """Mostly real keys (so values get type- and range-checked), sometimes misspelt or foreign."""
    out = {}
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.sampled_from(sorted(FIELDS)) | st.text(max_size=10))
        sub = FIELDS.get(key)
        if sub and draw(st.booleans()):
            section = {}
            for _ in range(draw(st.integers(0, 4))):
                k = draw(st.sampled_from(sub) | st.text(max_size=10))
                section[k] = draw(values)
            out[key] = section
        else:
            out[key] = draw(values)
    return out


def _check_config_error(e: ConfigError, where: str) -> None:
    msg = str(e)
    assert msg.startswith(where), f"error does not say where: {msg!r}"
    assert len(msg) > len(where) + 10, f"error does not say what: {msg!r}"
    assert "`" in msg or "YAML" in msg or "mapping" in msg, f"error names no key: {msg!r}"


def _no_nan(cfg) -> None:
    import dataclasses

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, prefix + f.name + ".")
            elif isinstance(v, float):
                assert not math.isnan(v), f"config accepted NaN for `{prefix}{f.name}`"

    walk(cfg, "")


@pytest.fixture(scope="module")
def config_counter(fault_table):
    c = Counter()
    yield c
    fault_table.record(
        AREA,
        "config: random nested dicts (MonitorConfig.from_dict)",
        c.outcome(
            f"parsed or ConfigError naming the key ({c.rejected} rejected); no other exception type"
        ),
        bad_inputs=c.tried,
    )


@settings(**SETTINGS)
@given(data=config_dicts())
@example(data={"sinks": ["store"]})
@example(data={1: 2})
def test_config_from_dict(data, config_counter):
    with config_counter.track():
        try:
            cfg = MonitorConfig.from_dict(data, where="cfg.yaml")
        except ConfigError as e:
            config_counter.rejected += 1
            _check_config_error(e, "cfg.yaml")
            return
        # what it accepted round-trips (NaN != NaN: see test_config_rejects_nan for NaN itself)
        again = MonitorConfig.from_dict(cfg.to_dict())
        assert again == cfg or "nan" in repr(cfg.to_dict()).lower()


NAN_BUG = (
    "config.py: `validate` compares `v < min` which is False for NaN, so NaN passes every range "
    "check (dist_timeout_s=NaN, band_sigma=NaN ...). Fix in the report."
)


@pytest.mark.parametrize(
    "data",
    [
        {"dist_timeout_s": float("nan")},
        {"alerts": {"band_sigma": float("nan")}},
        {"probes": {"timeout_s": float("nan")}},
    ],
)
def test_config_rejects_nan(data):
    with pytest.raises(ConfigError, match="nan|NaN"):
        MonitorConfig.from_dict(data, where="cfg.yaml")


# random YAML text: mutations of a valid config, and YAML constructs that compose but do not construct
VALID_YAML = MonitorConfig(run_name="r", probes={"docs_per_task": 10}).to_yaml()
yaml_snippets = st.sampled_from(
    [
        "probe_every: 100\n",
        "probes:\n  batch_size: -1\n",
        "sinks:\n  enabled: [store, bogus]\n",
        "probe_every: !!binary aGVsbG8=\n",
        "run_name: &x [*x]\n",
        "probes: !!set {a, b}\n",
        "alerts:\n  phases: 2020-01-01\n",
        "\t: bad\n",
        "probe_every: 1e3\n",
        "strict: yes\n",
        "- 1\n- 2\n",
        "indicators:\n  collect_every: .nan\n",
        "dist_timeout_s: .inf\n",
        "%YAML 1.1\n---\n",
        "probes: {tasks: [{a: 1}]}\n",
        "'\n",
    ]
)


@st.composite
def yaml_texts(draw):
    base = draw(st.sampled_from([VALID_YAML, ""]))
    lines = base.splitlines(keepends=True)
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(lines)))
        ins = draw(yaml_snippets | st.text(max_size=20))
        lines.insert(pos, ins)
    if lines and draw(st.booleans()):
        del lines[draw(st.integers(0, len(lines) - 1))]
    return "".join(lines)


@pytest.fixture(scope="module")
def yaml_counter(fault_table):
    c = Counter()
    yield c
    fault_table.record(
        AREA,
        "config: random YAML text (MonitorConfig.from_yaml)",
        c.outcome(
            f"parsed or ConfigError naming file:line or the key ({c.rejected} rejected); "
            "no other exception type"
        ),
        bad_inputs=c.tried,
    )


@settings(**SETTINGS)
@given(text=yaml_texts())
@example(text="probe_every: !!binary aGVsbG8=\n")
def test_config_from_yaml(text, yaml_counter, tmp_path_factory):
    with yaml_counter.track():
        path = _scratch(tmp_path_factory) / "monitor.yaml"
        path.write_text(text)
        try:
            MonitorConfig.from_yaml(path)
        except ConfigError as e:
            yaml_counter.rejected += 1
            _check_config_error(e, str(path))
            return


# YAML that composes but does not construct (unhashable keys, unknown or python tags). These are
# kept out of the generator above until the bug is fixed; then add them back to yaml_snippets.
CONSTRUCTOR_ERRORS = [
    "? [a, b]\n: 1\n",
    "a: !!python/object:os.system x\n",
    "run_name: !!python/name:os.system\n",
]


@pytest.mark.parametrize("text", CONSTRUCTOR_ERRORS)
def test_yaml_constructor_errors_are_config_errors(text, tmp_path, fault_table):
    path = tmp_path / "monitor.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        MonitorConfig.from_yaml(path)
    _check_config_error(err.value, str(path))
    fault_table.record(
        AREA,
        "config: YAML that composes but cannot be constructed (python tags, unhashable keys)",
        "ConfigError naming file:line",
        bad_inputs=1,
    )


# ---- the requests JSONL parser ------------------------------------------------------------------


def _request_line(draw):
    row = {
        "doc_id": draw(
            st.integers(0, 3) | st.text(max_size=3) | st.none() | st.booleans() | st.floats()
        ),
        "idx": draw(st.integers(-1, 3) | st.none() | st.text(max_size=2)),
        "label": draw(
            st.integers(-1, 3)
            | st.none()
            | st.text(max_size=4)
            | st.lists(st.text(max_size=3), max_size=2)
        ),
        "request": draw(
            st.fixed_dictionaries(
                {
                    "context": st.text(max_size=12) | st.integers(),
                    "continuation": st.text(max_size=12) | st.none(),
                }
            )
            | st.text(max_size=5)
            | st.none()
        ),
    }
    for k in list(row):
        if draw(st.integers(0, 9)) == 0:
            del row[k]
    if draw(st.booleans()):
        row["task_name"] = draw(st.sampled_from(["t1", "t2", "", "hellaswag"]) | st.integers())
    if draw(st.integers(0, 5)) == 0:
        row["capability"] = draw(st.sampled_from(["math", "nonsense", "code"]) | st.none())
    return json.dumps(row)


@st.composite
def requests_files(draw):
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.text(max_size=30)).replace("\n", " "))  # not JSON
        elif kind == 1:
            lines.append(json.dumps(draw(values)))  # JSON, wrong shape
        else:
            lines.append(_request_line(draw))
    return "\n".join(lines)


VALID_REQUESTS = "\n".join(
    json.dumps(
        {
            "doc_id": d,
            "idx": i,
            "label": 0,
            "request": {"context": f"Question {d}?", "continuation": f" answer {i}"},
        }
    )
    for d in range(2)
    for i in range(2)
)


@pytest.fixture(scope="module")
def requests_counter(fault_table):
    c = Counter()
    yield c
    fault_table.record(
        AREA,
        "requests JSONL: random lines (probes.tasks.load_requests_file)",
        c.outcome(
            f"parsed or TaskError naming file:line and the field ({c.rejected} rejected); "
            "no other exception type"
        ),
        bad_inputs=c.tried,
    )


@settings(**SETTINGS)
@given(text=requests_files())
@example(text=VALID_REQUESTS)
@example(
    text='{"doc_id": 0, "idx": 0, "label": 0, "request": {"context": "a", "continuation": "b"}}'
)
@example(text='{"doc_id": 1e400}')
@example(text="\ud800")
def test_requests_jsonl(text, requests_counter, tmp_path_factory):
    from fineline_monitor.probes.tasks import TaskError, load_requests_file

    with requests_counter.track():
        path = _scratch(tmp_path_factory) / "user_task.jsonl"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            tasks = load_requests_file(str(path))
        except TaskError as e:
            requests_counter.rejected += 1
            msg = str(e)
            assert msg.startswith(str(path)), msg
            assert re.match(re.escape(str(path)) + r"(:\d+)?: \S", msg), (
                f"no file[:line]: what: {msg!r}"
            )
            return
        assert tasks and all(t for t in tasks)


# ---- the trajectory CSV parser ------------------------------------------------------------------

HEADER = ["source", "model", "params", "step", "tokens", "task", "metric", "value", "stderr"]
cells = st.sampled_from(
    [
        "",
        "0",
        "1",
        "100",
        "1e9",
        "nan",
        "inf",
        "-1",
        "0.5",
        "x",
        "hellaswag",
        "acc",
        "a,b",
        '"q"',
        "1.5e",
        "NaN",
    ]
) | st.text(max_size=6)


@st.composite
def trajectory_texts(draw):
    header = list(HEADER)
    if draw(st.integers(0, 4)) == 0:
        header = (
            draw(st.permutations(HEADER))
            if draw(st.booleans())
            else header[: draw(st.integers(0, 8))]
        )
    if draw(st.integers(0, 9)) == 0:
        header.append(draw(st.sampled_from(["extra", "step"])))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 6)) == 0:
            w.writerow([draw(cells) for _ in range(draw(st.integers(0, 11)))])
        else:
            w.writerow(
                [
                    draw(st.sampled_from(["ref", "x"])),
                    draw(st.sampled_from(["m1", "m2"])),
                    draw(cells),
                    draw(st.integers(0, 5).map(str) | cells),
                    draw(st.integers(0, 10**6).map(str) | cells),
                    draw(st.sampled_from(["hellaswag", "arc_easy"]) | cells),
                    draw(st.sampled_from(["acc", "bpb"])),
                    draw(st.floats(0, 1).map(repr) | cells),
                    draw(cells),
                ]
            )
    text = buf.getvalue()
    if draw(st.integers(0, 6)) == 0:
        text = text[: draw(st.integers(0, len(text)))] + draw(st.text(max_size=8))
    return text


@pytest.fixture(scope="module")
def trajectory_counter(fault_table):
    c = Counter()
    yield c
    fault_table.record(
        AREA,
        "trajectory CSV: random tables (core.trajectory.read_trajectory)",
        c.outcome(
            f"parsed or TrajectoryError naming file:line and the column ({c.rejected} rejected); "
            "no other exception type"
        ),
        bad_inputs=c.tried,
    )


@settings(**SETTINGS)
@given(text=trajectory_texts())
@example(
    text="source,model,params,step,tokens,task,metric,value,stderr\nr,m,,1,100,hellaswag,acc,0.5,\n"
)
@example(
    text="source,model,params,step,tokens,task,metric,value,stderr\nr,m,,1,100,hellaswag,acc,nan,\n"
)
@example(text="\x00")
def test_trajectory_csv(text, trajectory_counter, tmp_path_factory):
    from fineline_monitor.core.trajectory import TrajectoryError, read_trajectory

    with trajectory_counter.track():
        path = _scratch(tmp_path_factory) / "traj.csv"
        path.write_text(text)
        try:
            read_trajectory(path)
        except TrajectoryError as e:
            trajectory_counter.rejected += 1
            msg = str(e)
            assert re.match(re.escape(str(path)) + r"(:\d+)?: \S", msg), (
                f"no file[:line]: what: {msg!r}"
            )
