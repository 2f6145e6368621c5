"""``python -m benchmarks.label_noise``: the command line (``cli.main``)."""

from benchmarks.label_noise import cli

if __name__ == '__main__':
  cli.main()
