"""`python -m difftrain_dist ...` is the `difftrain-dist` CLI (handy under torchrun: `-m difftrain_dist`)."""

from difftrain_dist.launcher.app import main

main()
