"""`lmforge data check`: run fetch, align and tokenize through the flow and show what training would see."""

from __future__ import annotations

import json
from pathlib import Path

from components.config import PipelineConfig


def check_data(cfg: PipelineConfig) -> tuple[str, str]:
    """Returns (alignment report + tokenization stats, decoded samples with trained tokens marked).

    Runs the flow up to the tokenize stage, so cached stages are reused and nothing is trained.
    """
    from components.data.align import format_report
    from flows.domain_adaptation import domain_adaptation

    summary = domain_adaptation(config=cfg, until="tokenize")
    align_dir, tok_dir = Path(summary["stages"]["align"]), Path(summary["stages"]["tokenize"])
    report = format_report(json.loads((align_dir / "report.json").read_text(encoding="utf-8")))
    stats = json.loads((tok_dir / "stats.json").read_text(encoding="utf-8"))
    lines = [report, "", "tokenization:"]
    for group, s in stats.items():
        lines.append(f"  {group}: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    lines += ["", f"aligned data: {align_dir}", f"tokenized data: {tok_dir}"]
    samples_path = tok_dir / "samples.txt"
    samples = samples_path.read_text(encoding="utf-8") if samples_path.is_file() else ""
    return "\n".join(lines), samples
