"""Reports built from a run's results file (fixtures/judging.py): index.json, requirements.json, the
matrix page (reports/html.py) and the merge of shards' results (reports/merge.py).

See reports/README.md; `python -m reports build` writes them, `python -m reports merge` combines shards.
"""

from reports.index import (
    INDEX_SCHEMA,
    REQUIREMENTS_SCHEMA,
    ReportError,
    build_index,
    build_requirements,
    write_reports,
)

__all__ = ["INDEX_SCHEMA", "REQUIREMENTS_SCHEMA", "ReportError", "build_index", "build_requirements",
           "write_reports"]
