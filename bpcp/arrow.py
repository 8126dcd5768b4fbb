"""pyarrow as bpcp imports it: without the pandas import pyarrow makes on its first conversion.

pyarrow's first conversion of a Python object (``pa.array([...])``, ``pa.table({...})``) imports
pandas, only to ask whether the object is a pandas one; bpcp never hands it one, and the import
costs 0.4-1.3 s in every command that plans or merges (a third of a small merge). That first
question is answered here with pandas hidden; pyarrow remembers the answer, yet still imports
pandas when it is really asked for (``to_pandas()``), so nothing else changes.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder

import pyarrow as pa
import pyarrow.compute as pc


class _HidePandas(MetaPathFinder):
    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is hidden while pyarrow looks for it")


def _answer_pyarrows_pandas_question() -> None:
    if "pandas" in sys.modules:       # imported already: nothing to save
        return
    sys.meta_path.insert(0, _HidePandas)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(_HidePandas)


_answer_pyarrows_pandas_question()

__all__ = ["pa", "pc"]
