"""bpcp: batch processing with CellProfiler on one host or many."""

__version__ = "0.1.0"
