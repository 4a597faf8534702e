"""What a compiled artifact depends on, for Inductor's and AOTAutograd's caches: mst_fx's
code and the MSTConfig (``rewrite_identity``), and the users' own Inductor custom passes
that mst_fx's passes chain to (``custom_passes``, ``chained_uuid``).

Inductor puts a custom pass's ``uuid()`` into its FX graph and AOTAutograd cache keys, so
an artifact compiled under another config or another version of the passes is never
reused, and the same config in a second process hits the cache.
"""

from __future__ import annotations

import functools
import pathlib

from torch._inductor.custom_graph_pass import get_hash_for_files


@functools.cache
def code_hash() -> str:
    """Hash of every source file of mst_fx and its passes (every stage's folder)."""
    import mst_fx
    import mst_fx.passes

    files = sorted(str(p) for m in (mst_fx, mst_fx.passes)
                   for p in pathlib.Path(m.__file__).parent.rglob("*.py"))
    return get_hash_for_files(tuple(files)).hex()


def rewrite_identity(config) -> str:
    """What a rewritten graph depends on besides itself: the code and the config."""
    return f"{code_hash()}|{config!r}"


def custom_passes(value) -> tuple:
    """An Inductor custom-pass config value (None, one pass, or a list of them) as a tuple."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def chained_uuid(mine, chained: tuple):
    """``mine`` with the uuids of the user's own passes that run before ours."""
    if not chained:
        return mine
    return (mine, *(p.uuid() if hasattr(p, "uuid") else repr(p) for p in chained))
