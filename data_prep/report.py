"""The summary table printed at the end of a run: every file found is accounted for."""

from __future__ import annotations

from collections import Counter

from data_prep.build import SplitReport
from data_prep.quirks import reason_category


def _rows(report: SplitReport) -> list[tuple[str, str]]:
    manifest = report.manifest
    rows = [
        ("files found", str(report.files_found)),
        ("samples written", str(manifest.num_samples)),
        ("  kept grayscale", str(report.grayscale)),
    ]
    rows += [(f"  converted: {kind}", str(count)) for kind, count in sorted(manifest.converted.items())]
    quarantined = Counter(reason_category(q.reason) for q in manifest.quarantined)
    rows.append(("quarantined", str(len(manifest.quarantined))))
    rows += [(f"  {reason}", str(count)) for reason, count in sorted(quarantined.items())]
    rows += [
        ("shards", str(len(manifest.shards))),
        ("  reused from an earlier run", str(report.shards_reused)),
        ("bytes written", f"{sum(s.bytes for s in manifest.shards):,}"),
    ]
    if manifest.empty_classes:
        kept = [name for name in manifest.empty_classes if name in manifest.classes]
        rows.append(("empty class folders", str(len(manifest.empty_classes))))
        rows += [(f"  {name}", "kept (no samples)" if name in kept else "left out") for name in manifest.empty_classes]
    return rows


def format_summary(reports: list[SplitReport]) -> str:
    lines = []
    for report in reports:
        rows = _rows(report)
        width = max(len(label) for label, _ in rows)
        lines.append(f"== {report.manifest.split} ({report.manifest.num_classes} classes)")
        lines += [f"{label:<{width}}  {value:>14}" for label, value in rows]
        accounted = report.manifest.num_samples + len(report.manifest.quarantined)
        if accounted != report.files_found:  # would mean a silently dropped file: make it loud
            lines.append(f"!! {report.files_found - accounted} files unaccounted for")
    return "\n".join(lines)
