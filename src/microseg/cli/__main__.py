"""``python -m microseg.cli``."""

from microseg.cli import main

main()
