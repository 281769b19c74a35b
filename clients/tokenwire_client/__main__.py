"""``python -m tokenwire_client`` runs the demo."""

from .demo import main

raise SystemExit(main())
