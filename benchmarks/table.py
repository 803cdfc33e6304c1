"""One row of ``benchmarks/results.md``: ``fmt(row)`` for the rows every section returns
(what, baseline, seconds or value, ratio, target); shared by ``run`` and ``sessions``."""
from __future__ import annotations


def fmt(r: dict) -> str:
    if "value" in r:
        a, b = f"{r['value']:.0f} img/s", f"{r['baseline_value']:.0f} img/s"
    else:
        unit, scale = ("s", 1) if r["seconds"] > 10 else ("ms", 1000)
        a, b = f"{r['seconds'] * scale:.1f} {unit}", f"{r['baseline_seconds'] * scale:.1f} {unit}"
    extra = (f"trace keeps {r['kept_mb']:.1f} MB vs {r['baseline_kept_mb']:.1f} MB; peak memory of the first call "
             f"+{r['peak_mb']:.0f} MB vs +{r['baseline_peak_mb']:.0f} MB (plain forward +{r['forward_peak_mb']:.0f} MB, "
             f"{r['forward_seconds'] * 1000:.1f} ms); one query row {r['row_ms']:.2f} ms" if "peak_mb" in r else "")
    return f"| {r['what']} | {a} | {r['baseline']}: {b} | {r['ratio']:.2f}× | {r.get('target', '')}{extra} |"
