"""Tiny inline-SVG line charts for the HTML report (no JS library, no CDN, no numpy).

A chart is lines, optional shaded bands (expected ranges), phase shading behind everything
and alert markers on top. Points with non-finite values are skipped (the alerts table says
what happened there). Every point has a <title> so hovering shows its exact value.
"""

from __future__ import annotations

import html
import math
from typing import Iterable, List, Optional, Sequence, Tuple

PALETTE = (
    "#2563eb",
    "#dc2626",
    "#059669",
    "#d97706",
    "#7c3aed",
    "#db2777",
    "#0891b2",
    "#65a30d",
    "#4b5563",
    "#b45309",
)
PHASE_COLORS = {
    "warmup": "#fef3c7",
    "stable": "#dcfce7",
    "decay": "#dbeafe",
    "anneal": "#ede9fe",
    "rewarm": "#fee2e2",
}
SEVERITY_COLORS = {"critical": "#b91c1c", "warning": "#d97706", "info": "#2563eb"}

Point = Tuple[float, float]


def _finite(points: Iterable[Tuple[Optional[float], Optional[float]]]) -> List[Point]:
    out = []
    for x, y in points:
        if x is None or y is None:
            continue
        x, y = float(x), float(y)
        if math.isfinite(x) and math.isfinite(y):
            out.append((x, y))
    return out


def nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    """Round tick values covering [lo, hi] (1-2-5 steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2g}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


class Chart:
    def __init__(
        self,
        title: str,
        *,
        x_label: str = "step",
        y_label: str = "",
        width: int = 480,
        height: int = 230,
        log_y: bool = False,
    ):
        self.title = title
        self.x_label = x_label
        self.y_label = y_label
        self.width = width
        self.height = height
        self.log_y = log_y
        self.lines: List[Tuple[str, List[Point], str, bool]] = []
        self.bands: List[Tuple[str, List[Tuple[float, float, float]], str]] = []
        self.phases: List[Tuple[float, float, str]] = []
        self.markers: List[Tuple[float, str, str]] = []

    # ---- building ------------------------------------------------------------------------
    def line(
        self,
        label: str,
        points: Iterable[Tuple[Optional[float], Optional[float]]],
        color: Optional[str] = None,
        dashed: bool = False,
    ) -> "Chart":
        pts = _finite(points)
        if self.log_y:
            pts = [(x, y) for x, y in pts if y > 0]
        if pts:
            self.lines.append(
                (label, pts, color or PALETTE[len(self.lines) % len(PALETTE)], dashed)
            )
        return self

    def band(
        self,
        label: str,
        rows: Iterable[Tuple[Optional[float], Optional[float], Optional[float]]],
        color: str = "#2563eb",
    ) -> "Chart":
        pts = []
        for x, lo, hi in rows:
            if None in (x, lo, hi):
                continue
            if all(math.isfinite(float(v)) for v in (x, lo, hi)):
                pts.append((float(x), float(lo), float(hi)))
        if pts:
            self.bands.append((label, sorted(pts), color))
        return self

    def phase_spans(self, spans: Sequence[Tuple[float, float, str]]) -> "Chart":
        self.phases = list(spans)
        return self

    def marker(self, x: float, severity: str, text: str) -> "Chart":
        self.markers.append((float(x), severity, text))
        return self

    @property
    def empty(self) -> bool:
        return not self.lines and not self.bands

    # ---- rendering -----------------------------------------------------------------------
    def _y(self, v: float) -> float:
        return math.log10(v) if self.log_y else v

    def render(self) -> str:
        W, H = self.width, self.height
        ml, mr, mt, mb = 58, 12, 26, 40
        pw, ph = W - ml - mr, H - mt - mb
        xs = [p[0] for _, pts, _, _ in self.lines for p in pts] + [
            b[0] for _, bs, _ in self.bands for b in bs
        ]
        ys = [self._y(p[1]) for _, pts, _, _ in self.lines for p in pts]
        for _, bs, _ in self.bands:
            for _, lo, hi in bs:
                if not self.log_y or lo > 0:
                    ys.append(self._y(lo))
                if not self.log_y or hi > 0:
                    ys.append(self._y(hi))
        esc = html.escape
        out = [
            f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" role="img" aria-label="{esc(self.title)}">',
            f'<text x="{ml}" y="16" class="ct">{esc(self.title)}</text>',
        ]
        if not xs or not ys:
            out.append(
                f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="na">no data</text></svg>'
            )
            return "".join(out)
        x0, x1 = min(xs), max(xs)
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
        y0, y1 = min(ys), max(ys)
        pad = (y1 - y0) * 0.06 or (abs(y0) * 0.1 or 1.0)
        y0, y1 = y0 - pad, y1 + pad

        def X(x: float) -> float:
            return ml + (x - x0) / (x1 - x0) * pw

        def Y(y: float) -> float:
            return mt + ph - (self._y(y) - y0) / (y1 - y0) * ph

        def Yr(yv: float) -> float:  # already in axis space
            return mt + ph - (yv - y0) / (y1 - y0) * ph

        out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="pa"/>')
        for a, b, name in self.phases:
            a, b = max(a, x0), min(b, x1)
            if b <= a:
                continue
            out.append(
                f'<rect x="{X(a):.1f}" y="{mt}" width="{X(b) - X(a):.1f}" height="{ph}" '
                f'fill="{PHASE_COLORS.get(name, "#f3f4f6")}"><title>phase {esc(name)}</title></rect>'
            )
            if X(b) - X(a) > 34:
                out.append(f'<text x="{X(a) + 3:.1f}" y="{mt + 11}" class="ph">{esc(name)}</text>')
        yticks = nice_ticks(y0, y1)
        if (
            self.log_y and math.floor(y1) - math.ceil(y0) >= 1
        ):  # whole decades read best on a log axis
            yticks = [float(e) for e in range(math.ceil(y0), math.floor(y1) + 1)]
        for t in yticks:
            out.append(
                f'<line x1="{ml}" x2="{ml + pw}" y1="{Yr(t):.1f}" y2="{Yr(t):.1f}" class="gr"/>'
            )
            label = fmt(10**t) if self.log_y else fmt(t)
            out.append(
                f'<text x="{ml - 4}" y="{Yr(t) + 3:.1f}" text-anchor="end" class="tk">{label}</text>'
            )
        for t in nice_ticks(x0, x1):
            out.append(
                f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" class="ax"/>'
            )
            out.append(
                f'<text x="{X(t):.1f}" y="{mt + ph + 15}" text-anchor="middle" class="tk">{fmt(t)}</text>'
            )
        out.append(
            f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" class="ax"/>'
            f'<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + ph}" class="ax"/>'
        )
        out.append(
            f'<text x="{ml + pw / 2}" y="{H - 6}" text-anchor="middle" class="al">{esc(self.x_label)}</text>'
        )
        if self.y_label:
            out.append(
                f'<text transform="translate(12 {mt + ph / 2}) rotate(-90)" text-anchor="middle" '
                f'class="al">{esc(self.y_label)}</text>'
            )
        for label, bs, color in self.bands:
            upper = " ".join(
                f"{X(x):.1f},{Y(hi) if not self.log_y or hi > 0 else mt + ph:.1f}"
                for x, _, hi in bs
            )
            lower = " ".join(
                f"{X(x):.1f},{Y(lo) if not self.log_y or lo > 0 else mt + ph:.1f}"
                for x, lo, _ in reversed(bs)
            )
            if len(bs) == 1:  # a single band point: draw an error bar
                x, lo, hi = bs[0]
                out.append(
                    f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{Y(lo):.1f}" y2="{Y(hi):.1f}" '
                    f'stroke="{color}" stroke-width="6" opacity="0.25"><title>{esc(label)}</title></line>'
                )
            else:
                out.append(
                    f'<polygon points="{upper} {lower}" fill="{color}" opacity="0.16">'
                    f"<title>{esc(label)}</title></polygon>"
                )
        for label, pts, color, dashed in self.lines:
            d = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts)
            dash = ' stroke-dasharray="5 4"' if dashed else ""
            out.append(
                f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.8"{dash}>'
                f"<title>{esc(label)}</title></polyline>"
            )
            if len(pts) <= 80 and not dashed:
                for x, y in pts:
                    out.append(
                        f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.4" fill="{color}">'
                        f"<title>{esc(label)} @ {fmt(x)}: {y:.6g}</title></circle>"
                    )
        for x, sev, text in self.markers:
            if not (x0 <= x <= x1):
                continue
            c = SEVERITY_COLORS.get(sev, "#111827")
            out.append(
                f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{mt}" y2="{mt + ph}" stroke="{c}" '
                f'stroke-width="1.3" stroke-dasharray="3 2"><title>{esc(text)}</title></line>'
                f'<path d="M{X(x) - 5:.1f},{mt} L{X(x) + 5:.1f},{mt} L{X(x):.1f},{mt + 8} Z" fill="{c}">'
                f"<title>{esc(text)}</title></path>"
            )
        # legend, top right (the curves usually start bottom left or top left)
        items = [(lab, col, dsh) for lab, _, col, dsh in self.lines][:6]
        items += [(lab, col, None) for lab, _, col in self.bands][:2]
        lx, ly = ml + pw - 6, mt + 12
        for lab, col, dsh in items:
            out.append(
                f'<text x="{lx - 18}" y="{ly + 1}" text-anchor="end" class="lg">{esc(lab[:48])}</text>'
            )
            if dsh is None:
                out.append(
                    f'<rect x="{lx - 14}" y="{ly - 6}" width="14" height="8" fill="{col}" opacity="0.25"/>'
                )
            else:
                dash_attr = ' stroke-dasharray="4 3"' if dsh else ""
                out.append(
                    f'<line x1="{lx - 14}" x2="{lx}" y1="{ly - 2}" y2="{ly - 2}" stroke="{col}" '
                    f'stroke-width="2"{dash_attr}/>'
                )
            ly += 12
        out.append("</svg>")
        return "".join(out)
