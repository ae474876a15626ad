"""Command line: ``python -m fused_sched plot NAME ...`` (see fused_sched.plot)."""

import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m fused_sched plot NAME [--warmup N] [--total N] [--kw key=value ...] -o lr.png")
        return
    command, rest = argv[0], argv[1:]
    if command == "plot":
        from .plot import main as plot_main

        plot_main(rest)
        return
    raise SystemExit(f"unknown command {command!r}; commands: plot")


if __name__ == "__main__":
    main()
