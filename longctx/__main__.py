"""`python -m longctx ...` is the `longctx` CLI, so `torchrun -m longctx train ...` works."""

from longctx.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
