"""python -m train [prepare|synth|cross-source|tta|adapt] ... ; without a sub-command: train the stage models."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prepare":
        from train.prepare import main as prepare_main
        return prepare_main(argv[1:])
    if argv and argv[0] == "synth":
        from train.synth import main as synth_main
        return synth_main(argv[1:])
    if argv and argv[0] == "tta":
        from train.tta import main as tta_main
        return tta_main(argv[1:])
    if argv and argv[0] == "adapt":
        from train.adapt import main as adapt_main
        return adapt_main(argv[1:])
    if argv and argv[0] == "cross-source":
        from train.cross_source import main as cross_main
        return cross_main(argv[1:])
    from train.trainer import main as train_main
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
