"""mst_fx: a torch.compile backend that trains long sequences in less memory.

It finds token-wise MLP blocks and the vocabulary projection + loss in the captured graph
and runs each as a loop over mini-sequences of tokens whose intermediates are never held
whole (the Mini-Sequence Transformer method), then hands the graph to Inductor.

    import torch, mst_fx
    compiled = torch.compile(model, backend=mst_fx.mst_backend)
    print(mst_fx.explain(model, *inputs))
"""

import logging
import os


def _source_tree_passes() -> None:
    """From a source checkout (tests, ``python -m mst_fx`` in the repo root) the passes live
    in ``passes/`` beside this package; an install maps them to ``mst_fx.passes`` through
    pyproject's package-dir. Make the source layout import the same way."""
    import importlib.util
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    beside = os.path.join(os.path.dirname(here), "passes")
    if os.path.isdir(os.path.join(here, "passes")) or "mst_fx.passes" in sys.modules \
            or not os.path.isfile(os.path.join(beside, "__init__.py")):
        return
    spec = importlib.util.spec_from_file_location(
        "mst_fx.passes", os.path.join(beside, "__init__.py"), submodule_search_locations=[beside])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mst_fx.passes"] = module
    spec.loader.exec_module(module)
    globals()["passes"] = module


# Before the imports below: the backend imports passes (post-grad, joint).
_source_tree_passes()

from mst_fx.backend import MSTBackend, explain, make_backend, mst_backend  # noqa: E402
from mst_fx.config import MSTConfig  # noqa: E402
from mst_fx.report import Region, Report, Skipped  # noqa: E402

__all__ = ["MSTBackend", "MSTConfig", "Region", "Report", "Skipped", "explain",
           "make_backend", "mst_backend"]
__version__ = "0.1.0"

_log = logging.getLogger("mst_fx")
_log.addHandler(logging.NullHandler())
if os.environ.get("MST_FX_LOG"):
    _log.setLevel(os.environ["MST_FX_LOG"].upper())
    _log.addHandler(logging.StreamHandler())


