"""``nemodiff-data pretrain|sft ...`` — prepare (tokenize, pack, memory-map) training data ahead of a run."""

from ..data.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
