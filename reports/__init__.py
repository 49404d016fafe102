"""Reports built from a run's results file (fixtures/judging.py): index.json and requirements.json.

See reports/README.md; `python -m reports build` writes them.
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
