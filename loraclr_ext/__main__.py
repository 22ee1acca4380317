"""``python -m loraclr_ext``: see :mod:`loraclr_ext.cli`."""

from loraclr_ext.cli import main

raise SystemExit(main())
