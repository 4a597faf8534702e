"""Entry point for ``python -m mst_fx`` (see mst_fx.demo)."""

from mst_fx.demo import main

main()
