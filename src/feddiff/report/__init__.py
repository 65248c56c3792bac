"""Reports read run folders only; they never retrain.

- :mod:`.rows`: one flat row per run, baselines and savings, the terminal table of sweeps.
- :mod:`.figures`: the plots (matplotlib, no display needed).
- :mod:`.document`: ``feddiff report``: a self-contained HTML page and a Markdown summary.
"""

from feddiff.report.rows import RunData, compare, load_run, summarize_run, table

__all__ = ["RunData", "compare", "load_run", "summarize_run", "table"]
