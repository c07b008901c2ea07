"""`python -m gradtap.cli ...` runs the `gradtap` command (the tests start servers this way)."""

from . import main

main()
