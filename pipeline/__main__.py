"""`etpo` (and `python -m pipeline`): the CLI, re-executed under tcmalloc first where it is installed,
before the CLI's own imports (`pipeline.allocator`)."""

from pipeline.allocator import use_tcmalloc


def main() -> None:
    use_tcmalloc()
    from pipeline.cli import app  # after the re-execution: imported once

    app()


if __name__ == "__main__":
    main()
