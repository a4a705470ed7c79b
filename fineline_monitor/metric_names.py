"""Every metric name the monitor logs, in one place.

A name is namespaced and readable (`optim/grad_norm`); the store, the console, W&B and the
report use it as it is, and the Prometheus exporter maps it to a `fineline_*` family. Each
entry says what the name means, its unit, what it costs to measure, who produces it and
which Prometheus family carries it. Producers, sinks, the report and the dashboard
builders import the names from here instead of spelling them, so a renamed metric cannot
leave a dashboard or an alert rule behind (tests/unit/test_metric_names.py checks the
rules, dashboards and runbook against this registry).

Adding a metric is one `_metric(...)` entry. Three shapes of name:

* plain: `optim/grad_norm`;
* per item: `optim/update_ratio/<group>` (`item="group"`); the plain name is the value
  over all items, exported with the label value `all`. Build one with `per_item(...)`;
* templates: `probe/<task>/<metric>`, `capability/<capability>`,
  `fineline/internal_error/<part>`; build them with `probe_key(...)` and friends.

`family=None` means the exporter gives the name a family of its own, `fineline_` plus the
name with every other character than letters, digits and `_` replaced by `_`
(`optim/adam_eps` -> `fineline_optim_adam_eps`), with a generic help text. The families the
exporter builds from its own state (liveness, probe rounds, alerts, the sinks' health) are
in FAMILIES, next to the ones that carry metric names.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

# Who produces a name (for the docs' "when" column).
EVERY_STEP = "indicators, reported at each collect step"
PROBE_ROUND = "indicators, at probe rounds"
MONITOR = "the monitor"
WANDB = "the W&B sink"


@dataclass(frozen=True)
class Metric:
    """One registered metric name."""

    name: str  # the name, or its template (`probe/<task>/<metric>`)
    help: str  # one line; the Prometheus HELP text of `family`
    family: Optional[str] = None  # Prometheus family; None: a family derived from the name
    unit: str = ""
    item: Optional[str] = None  # label of the per-item form `name/<item>` (group, layer)
    producer: str = EVERY_STEP
    meaning: str = ""  # longer than `help`, for the docs
    cost: str = ""
    timing: bool = False  # the value depends on the wall clock (excluded from run comparisons)

    @property
    def templated(self) -> bool:
        return "<" in self.name


@dataclass(frozen=True)
class Family:
    """One Prometheus family the exporter writes."""

    name: str
    help: str
    kind: str = "gauge"  # or "counter" (exposed with the `_total` suffix)
    labels: Tuple[str, ...] = ()  # besides `run`, which every series has
    unit: str = ""

    @property
    def sample_names(self) -> Tuple[str, ...]:
        return (self.name + "_total",) if self.kind == "counter" else (self.name,)


METRICS: Dict[str, Metric] = {}


def _metric(name: str, help: str, family: Optional[str] = None, **kw) -> str:
    METRICS[name] = Metric(name, help, family, **kw)
    return name


# ---- every step (indicators/step.py), reported at each collect step ------------------------------
LOSS = _metric(
    "train/loss",
    "Training loss at the last collection step.",
    "fineline_train_loss",
    unit="nats/token",
    meaning="latest loss (omitted when non-finite)",
    cost="one device copy per step",
)
LOSS_Z = _metric(
    "train/loss_z",
    "Loss z-score against its rolling window.",
    "fineline_train_loss_z",
    unit="sigmas",
    meaning="largest z-score, over the steps since the last collect, of a loss against the "
    "`loss_window` finite losses before it (needs >= 10 of them)",
    cost="host, at collect",
)
LR = _metric(
    "train/lr", "Learning rate.", "fineline_train_lr", meaning="latest learning rate", cost="none"
)
TOKENS = _metric(
    "train/tokens",
    "Training tokens seen so far.",
    "fineline_train_tokens",
    unit="tokens",
    meaning="tokens seen (`tokens`, else the running sum of `batch_tokens`)",
    cost="none",
)
TOKENS_PER_S = _metric(
    "train/tokens_per_s",
    "Training throughput in tokens per second.",
    "fineline_train_tokens_per_second",
    unit="tokens/s",
    timing=True,
    meaning="tokens between collects / host wall time between them",
    cost="none",
)
GRAD_NORM = _metric(
    "optim/grad_norm",
    "Global gradient norm.",
    "fineline_optim_grad_norm",
    meaning="latest global gradient L2 norm: the framework's, or computed once per step",
    cost="one read of the gradients per step if the framework does not pass it",
)
PARAM_NORM = _metric(
    "optim/param_norm",
    "Global parameter norm.",
    "fineline_optim_param_norm",
    meaning="global parameter L2 norm at the collect step",
    cost="one read of the parameters per `collect_every` steps",
)
NONFINITE_LOSS = _metric(
    "optim/nonfinite_loss",
    "Non-finite losses in the last collection window.",
    "fineline_optim_nonfinite_loss",
    unit="steps",
    meaning="steps since the last collect with a NaN/Inf loss",
    cost="none",
)
NONFINITE_GRAD = _metric(
    "optim/nonfinite_grad",
    "Non-finite gradients in the last collection window.",
    "fineline_optim_nonfinite_grad",
    unit="steps",
    meaning="steps since the last collect with a non-finite grad norm that were not skipped",
    cost="none",
)
LOSS_SCALE = _metric(
    "optim/loss_scale",
    "Mixed-precision loss scale.",
    "fineline_optim_loss_scale",
    meaning="latest fp16 loss scale, when the framework passes one",
    cost="none",
)
SKIPPED_STEPS = _metric(
    "optim/skipped_steps",
    "Optimizer steps skipped for overflow since the last collection.",
    "fineline_optim_skipped_steps",
    unit="steps",
    meaning="steps since the last collect the framework reported as skipped",
    cost="none",
)
GRAD_RMS_OVER_EPS_MIN = _metric(
    "optim/grad_rms_over_eps_min",
    "Smallest gradient RMS / Adam eps over parameter groups.",
    "fineline_optim_grad_rms_over_eps_min",
    producer=PROBE_ROUND,
    meaning="min over groups of grad RMS / Adam eps (learning stalls as it nears 1)",
    cost="none",
)
HESSIAN_TRACE = _metric(
    "optim/hessian_trace",
    "Hutchinson estimate of the Hessian trace.",
    "fineline_optim_hessian_trace",
    producer=PROBE_ROUND,
    meaning="Hutchinson estimate of tr(H) on a small fixed batch (off by default)",
    cost="`hessian_samples` x (forward + double backward) on that batch",
)
OUTPUT_LOGIT_MAX = _metric(
    "stability/output_logit_max",
    "Largest output logit in the probe round.",
    "fineline_stability_output_logit_max",
    producer=PROBE_ROUND,
    meaning="largest output logit over real (non-padding) positions",
    cost="one max over the logits",
)
OUTPUT_LOGSUMEXP_MEAN = _metric(
    "stability/output_logsumexp_mean",
    "Mean output log-partition (logit divergence indicator).",
    "fineline_stability_output_logsumexp_mean",
    producer=PROBE_ROUND,
    meaning="mean log-partition logsumexp(z) over real positions (what z-loss controls)",
    cost="one logsumexp over the logits",
)
PROBE_SECONDS = _metric(
    "monitor/probe_seconds",
    "Wall time of the last probe round.",
    "fineline_probe_round_seconds",
    unit="s",
    producer=MONITOR,
    timing=True,
    meaning="wall time of the probe round",
)
PROBE_TOKENS_PER_S = _metric(
    "monitor/probe_tokens_per_s",
    "Tokens per second scored by the last probe round.",
    "fineline_probe_tokens_per_second",
    unit="tokens/s",
    producer=MONITOR,
    timing=True,
    meaning="tokens scored by the probe round / its wall time",
)
OVERHEAD = _metric(
    "monitor/overhead",
    "Time inside the monitor over the loop's own training time, since attach.",
    "fineline_monitor_overhead_ratio",
    unit="ratio",
    producer=MONITOR,
    timing=True,
    meaning="time inside the monitor / the loop's own time, cumulative (what `probe_max_overhead` "
    "bounds)",
)
# ---- per item (`name/<group>`, `name/<layer>`); the plain name is the value over all items -------
UPDATE_RATIO = _metric(
    "optim/update_ratio",
    "Update/parameter norm ratio.",
    "fineline_optim_update_ratio",
    unit="ratio",
    item="group",
    meaning="|theta_t - theta_{t-1}| / |theta_t| at the collect step, all parameters and per "
    "optimizer param group",
    cost="one parameter copy (held one step) and one norm pass per `collect_every` steps",
)
GRAD_RMS = _metric(
    "optim/grad_rms",
    "Gradient RMS per parameter group.",
    "fineline_optim_grad_rms",
    item="group",
    producer=PROBE_ROUND,
    meaning="gradient RMS |g|/sqrt(n) of the group",
    cost="one gradient read per round",
)
ATTN_LOGIT_MAX = _metric(
    "stability/attn_logit_max",
    "Max attention logit.",
    "fineline_stability_attn_logit_max",
    item="layer",
    producer=PROBE_ROUND,
    meaning="largest pre-softmax attention logit over all layers, and per layer (> 1e3 harmful, > "
    "1e4 diverging)",
    cost="one extra QK^T product per layer and probe batch",
)
ACT_RMS = _metric(
    "stability/act_rms",
    "Activation RMS per layer.",
    "fineline_stability_act_rms",
    item="layer",
    producer=PROBE_ROUND,
    meaning="RMS of each block's output hidden state over real positions",
    cost="one norm per block output",
)
# ---- no family of their own in the exporter: `fineline_<name>` with a generic help ---------------
LOSS_MEAN = _metric(
    "train/loss_mean",
    "Mean of the last `loss_window` finite losses.",
    unit="nats/token",
    cost="host, at collect",
)
GRAD_NORM_MAX = _metric(
    "optim/grad_norm_max", "Largest finite gradient norm since the last collect.", cost="none"
)
ADAM_EPS = _metric(
    "optim/adam_eps", "Smallest Adam eps over parameter groups.", producer=PROBE_ROUND, cost="none"
)
EXP_AVG_SQ_MEAN = _metric(
    "optim/exp_avg_sq_mean",
    "Mean of Adam's exp_avg_sq (raw, not bias-corrected).",
    item="group",
    producer=PROBE_ROUND,
    cost="one state read per round",
)
V_BELOW_EPS_FRAC = _metric(
    "optim/v_below_eps_frac",
    "Fraction of elements with sqrt(v_hat) < eps.",
    unit="ratio",
    item="group",
    producer=PROBE_ROUND,
    cost="included in exp_avg_sq_mean",
)
# ---- probe rounds and the monitor's own health (templates) ---------------------------------------
PROBE_METRIC = _metric(
    "probe/<task>/<metric>",
    "Probe metric per task (acc, acc_norm, bpb, ...).",
    "fineline_probe_value",
    producer=MONITOR,
    meaning="a probe task's metric in one round; the exporter takes it, with its capability and "
    "stderr, from the probe round itself",
)
CAPABILITY_SCORE = _metric(
    "capability/<capability>/<series>",
    "Capability series: bpb, acc_above_chance, headline, took_off.",
    "fineline_capability_score",
    producer=MONITOR,
    meaning="a capability's series in one probe round: `bpb` (gold-continuation bits per byte, "
    "mean over its tasks, lower is better), `acc_above_chance` (mean accuracy minus chance, "
    "higher is better), `headline` (bpb until take-off, then acc_above_chance) and "
    "`took_off` (1 once accuracy is above chance beyond its noise)",
)
INTERNAL_ERROR = _metric(
    "fineline/internal_error",
    "Errors isolated inside the monitor (training went on).",
    "fineline_internal_errors",
    unit="errors",
    producer=MONITOR,
    meaning="errors isolated inside the monitor since attach",
)
PART_ERRORS = _metric(
    "fineline/internal_error/<part>",
    "Isolated monitor errors per component.",
    "fineline_component_errors",
    unit="errors",
    producer=MONITOR,
    meaning="the same per part (`probes`, `indicators`, `alerts`, `sink_<name>`)",
)
# ---- keys only the W&B sink logs -----------------------------------------------------------------
STEP = _metric("train/step", "Optimizer step (an x axis in W&B).", producer=WANDB)
PHASE_INDEX = _metric(
    "train/phase_index",
    "Training phase: 0 warmup, 1 stable, 2 decay, 3 anneal, 4 rewarm.",
    producer=WANDB,
)
ALERT_COUNT = _metric("alerts/<severity>", "Alerts fired so far at this severity.", producer=WANDB)
# W&B puts these after a curve's key: its stderr, and its expected value and band.
WANDB_SUFFIXES = ("_stderr", "_expected", "_low", "_high")


# ---- names built from parts ----------------------------------------------------------------------
def per_item(name: str, item: str) -> str:
    """`optim/update_ratio` + `matrices` -> `optim/update_ratio/matrices`."""
    return f"{name}/{item}"


def items_of(name: str, values: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """The per-item values of `name` among `values`, by item: {"h.0": 12.0, ...} for
    `stability/attn_logit_max/h.0`... (the plain value over all items is left out)."""
    prefix = name + "/"
    out: Dict[str, Optional[float]] = {}
    for key, value in values.items():
        if key.startswith(prefix) and len(key) > len(prefix):
            try:
                out[key[len(prefix) :]] = float(value)
            except (TypeError, ValueError):
                out[key[len(prefix) :]] = None
    return out


def probe_key(task: str, metric: str) -> str:
    return f"probe/{task}/{metric}"


def capability_key(capability: str) -> str:
    return f"capability/{capability}"


def part_errors_key(part: str) -> str:
    """The error counter of a monitor part: `sink:store` -> `fineline/internal_error/sink_store`."""
    return f"fineline/internal_error/{part.replace(':', '_')}"


def alert_count_key(severity: str) -> str:
    return f"alerts/{severity}"


def split_probe_key(name: str) -> Optional[Tuple[str, str]]:
    """(task, metric) of `probe/<task>/<metric>`, else None."""
    parts = name.split("/", 2)
    if len(parts) == 3 and parts[0] == "probe":
        return parts[1], parts[2]
    return None


# The series of a capability (`capability/<capability>/<series>`), their units and directions.
CAP_BPB = "bpb"
CAP_ACC = "acc_above_chance"
CAP_HEADLINE = "headline"
CAP_TOOK_OFF = "took_off"
CAPABILITY_SERIES = {
    CAP_BPB: ("bits per byte", "lower is better"),
    CAP_ACC: ("accuracy above chance", "higher is better"),
}
# What the alert engine judges a capability series as ("loss": lower is better, "acc":
# higher is better, chance 0); headline and took_off switch meaning, so they are not judged.
_CAPABILITY_JUDGED = {CAP_BPB: "loss", CAP_ACC: "acc"}


def capability_series_key(capability: str, series: str) -> str:
    return f"capability/{capability}/{series}"


def capability_judged_as(name: str) -> Optional[Tuple[str, str, str, Optional[float]]]:
    """(capability, series, "loss" | "acc", chance) for a judged capability key
    (`capability/code/bpb` -> ("code", "bpb", "loss", None)); None for any other name."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "capability" or parts[2] not in _CAPABILITY_JUDGED:
        return None
    how = _CAPABILITY_JUDGED[parts[2]]
    return parts[1], parts[2], how, (0.0 if how == "acc" else None)


def describe_capability_series(series: str) -> str:
    """`bpb` -> "bits per byte, lower is better"."""
    unit, better = CAPABILITY_SERIES.get(series, (series, ""))
    return f"{unit}, {better}" if better else unit


def split_capability_key(name: str) -> Optional[str]:
    """The capability part of `capability/<capability>[/<series>]` (with its series), else None."""
    head, sep, cap = name.partition("/")
    return cap if head == "capability" and sep else None


# ---- lookup --------------------------------------------------------------------------------------
def _pattern(m: Metric) -> "re.Pattern[str]":
    if m.templated:
        body = re.escape(m.name)
        body = re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", body)
        # the last part may hold slashes (metric names, part names): `probe/t/a/b` is metric `a/b`
        body = re.sub(r"\[\^/\]\+\)$", ".+)", body)
        return re.compile(body + "$")
    return re.compile(re.escape(m.name) + (rf"(?:/(?P<{m.item}>.+))?$" if m.item else "$"))


_PATTERNS: List[Tuple[Metric, "re.Pattern[str]"]] = []


@functools.lru_cache(maxsize=8192)
def lookup(name: str) -> Tuple[Optional[Metric], Optional[str]]:
    """(the registered metric a concrete name belongs to, its item or template part), or
    (None, None) for an unregistered name. `optim/update_ratio/matrices` ->
    (UPDATE_RATIO's entry, "matrices"); `optim/update_ratio` -> (the same, None)."""
    m = METRICS.get(name)
    if m is not None and not m.templated:
        return m, None
    if not _PATTERNS:
        # longest literal prefix first: `fineline/internal_error/<part>` before
        # `fineline/internal_error`
        ms = sorted(METRICS.values(), key=lambda m: -len(m.name.split("<", 1)[0]))
        _PATTERNS.extend((m, _pattern(m)) for m in ms)
    for m, pat in _PATTERNS:
        hit = pat.match(name)
        if hit:
            groups = [g for g in hit.groups() if g is not None]
            return m, (groups[-1] if groups else None)
    return None, None


def is_registered(name: str) -> bool:
    """Is `name` a metric name the monitor logs (W&B's derived keys included)?"""
    if lookup(name)[0] is not None:
        return True
    for suffix in WANDB_SUFFIXES:
        if name.endswith(suffix) and lookup(name[: -len(suffix)])[0] is not None:
            return True
    if name.startswith("probe_"):  # W&B's probe_<capability>/<task>/<metric>
        head, _, rest = name.partition("/")
        return bool(head[len("probe_") :]) and is_registered("probe/" + rest)
    return False


# ---- the Prometheus side -------------------------------------------------------------------------
_BAD = re.compile(r"[^a-zA-Z0-9_]")


def derived_family(name: str) -> str:
    """The family of a name without one of its own: `fineline_` + the name, sanitised."""
    return "fineline_" + _BAD.sub("_", name).strip("_")


def prom_name(name: str) -> Tuple[str, Dict[str, str]]:
    """(family, extra labels) of a monitor metric name logged through `log_metrics`.
    Probe, capability and error names are exported from the structured data instead."""
    m, item = lookup(name)
    if m is None or m.family is None or m.templated:
        return derived_family(name), {}
    if m.item:
        return m.family, {m.item: item if item is not None else "all"}
    return m.family, {}


def metric_families() -> List[Metric]:
    """Metrics whose values `log_metrics` writes into a family of their own: plain ones
    first, then per-item ones, in registration order (the exporter declares them in this
    order). Not the ones the exporter builds from its own state (FAMILIES)."""
    own = [
        m
        for m in METRICS.values()
        if m.family is not None and not m.templated and m.family not in FAMILIES
    ]
    return [m for m in own if not m.item] + [m for m in own if m.item]


def _family(
    name: str, help: str, kind: str = "gauge", labels: Tuple[str, ...] = (), unit: str = ""
) -> Family:
    return Family(name, help, kind, labels, unit)


# Families the exporter builds from its own state, in exposition order.
CURVE = ("name", "capability", "task", "metric")  # the labels of an expected band
PROBE = ("capability", "task", "metric")
FAMILIES: Dict[str, Family] = {
    f.name: f
    for f in (
        _family(
            "fineline_run_start_timestamp_seconds", "Unix time the monitor attached.", unit="s"
        ),
        _family("fineline_run_finished", "1 once the monitor was closed (the run ended)."),
        _family("fineline_last_step", "Last optimizer step the monitor saw."),
        _family(
            "fineline_last_step_timestamp_seconds",
            "Unix time of the last step the monitor saw.",
            unit="s",
        ),
        _family("fineline_probe_value", METRICS[PROBE_METRIC].help, labels=PROBE),
        _family("fineline_probe_stderr", "Standard error of the probe metric.", labels=PROBE),
        _family(
            "fineline_probe_docs",
            "Documents scored per task in each probe round.",
            labels=("capability", "task"),
        ),
        _family(
            "fineline_capability_score",
            METRICS[CAPABILITY_SCORE].help,
            labels=("capability", "series"),
        ),
        _family("fineline_probe_rounds", "Probe rounds completed.", "counter"),
        _family("fineline_probe_last_step", "Step of the last completed probe round."),
        _family(
            "fineline_last_probe_timestamp_seconds",
            "Unix time of the last completed probe round.",
            unit="s",
        ),
        _family(
            "fineline_probe_every_steps", "Configured probe cadence in steps (0: by tokens or off)."
        ),
        _family(
            "fineline_expected_value",
            "Expected value of a curve for the current phase.",
            labels=CURVE,
        ),
        _family("fineline_expected_low", "Lower edge of the expected band.", labels=CURVE),
        _family("fineline_expected_high", "Upper edge of the expected band.", labels=CURVE),
        _family(
            "fineline_phase",
            "Current training phase (1 for the current one, 0 otherwise).",
            labels=("phase",),
        ),
        _family("fineline_phase_start_step", "Step at which the current phase began."),
        # {hold_s} is sinks.prometheus_alert_hold_s
        _family(
            "fineline_alert_active",
            "1 while a monitor alert is active (fired within the last {hold_s:g}s).",
            labels=("rule", "severity", "capability", "task", "metric"),
        ),
        _family("fineline_alerts", "Monitor alerts fired.", "counter", ("rule", "severity")),
        _family("fineline_internal_errors", METRICS[INTERNAL_ERROR].help, "counter"),
        _family("fineline_component_errors", METRICS[PART_ERRORS].help, "counter", ("part",)),
        _family("fineline_probe_failures", "Probe rounds that failed.", "counter"),
        _family(
            "fineline_sink_dropped",
            "Items a sink dropped (queue full or closed).",
            "counter",
            ("sink",),
        ),
        _family(
            "fineline_sink_failed", "Items a sink gave up on after retries.", "counter", ("sink",)
        ),
        _family(
            "fineline_sink_queue_depth",
            "Items waiting in a sink's background queue.",
            labels=("sink",),
        ),
    )
}


def prometheus_sample_names() -> Dict[str, str]:
    """Every sample name the exporter can write under a registered family -> its family
    (counters with their `_total`). Derived families (`family=None`) are not in it: rules
    and dashboards should not depend on them."""
    out: Dict[str, str] = {}
    for f in FAMILIES.values():
        for s in f.sample_names:
            out[s] = f.name
    for m in metric_families():
        out[m.family] = m.family  # type: ignore[index]
    return out
