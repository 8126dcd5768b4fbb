"""What the user gives, read and checked: datasets, the pipeline (asked of CellProfiler itself), preflight."""
