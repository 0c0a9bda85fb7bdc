"""`python -m stopsign` (and `torchrun ... -m stopsign train DATA`): the `stopsign` command."""

from .cli import run

if __name__ == "__main__":
    run()
