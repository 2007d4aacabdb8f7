"""`python -m plugguide fit -c configs/ppap.yaml` is the same as `lightning fit -c ...`."""

from plugguide.cli import main

main()
