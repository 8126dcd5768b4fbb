"""From published jobs to what users read: completeness, the merged tables, the joblog, the report."""
