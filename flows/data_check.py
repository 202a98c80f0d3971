"""`lmforge data check`: run fetch, align and tokenize through the flow and show what training would see."""

from __future__ import annotations

from pathlib import Path

from components.config import PipelineConfig


def check_data(cfg: PipelineConfig) -> tuple[str, str]:
    """Returns (alignment report, decoded samples with trained tokens marked)."""
    from components.data.align import format_report
    from flows.domain_adaptation import domain_adaptation

    summary = domain_adaptation(config=cfg, until="tokenize")
    align_dir, tok_dir = Path(summary["stages"]["align"]), Path(summary["stages"]["tokenize"])
    import json

    report = format_report(json.loads((align_dir / "report.json").read_text()))
    stats = json.loads((tok_dir / "stats.json").read_text())
    lines = [report, "", "tokenization:"]
    for group, s in stats.items():
        lines.append(f"  {group}: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    samples = (tok_dir / "samples.txt").read_text() if (tok_dir / "samples.txt").is_file() else ""
    return "\n".join(lines), samples
